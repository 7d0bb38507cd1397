"""``python -m trainer serve``: the grpc.aio server with health, reflection and a clean stop."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from finetune.v1 import trainer_pb2, trainer_pb2_grpc
from trainer.config import ServiceConfig
from trainer.errors import Unavailable
from trainer.job_files import job_files_from_url
from trainer.layout import Layout
from trainer.memory import MemoryBudget
from trainer.object_store import adapter_store_from_url
from trainer.service.auth import Authenticator
from trainer.service.datasets import DatasetIngest
from trainer.service.jobs import Jobs
from trainer.service.metrics import Metrics
from trainer.service.observe import JobObserver
from trainer.service.publish import AdapterLoader, Publisher
from trainer.service.scheduler import EventBus, Scheduler
from trainer.service.servicer import STATUS, TrainerServicer
from trainer.service.store import SqliteStore, Store
from trainer.service.usage import Quotas, UsageCollector, UsageMeter
from trainer.service.wire import DecodeGuard
from trainer.tenants import tenant_registry

log = logging.getLogger(__name__)

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name
# Uploads arrive in chunks (the client sends 1 MiB); no single message needs more
# than this, and a cap keeps one call from holding a lot of memory.
MAX_MESSAGE_BYTES = 4 << 20
GRACE_S = 10.0


def _loader(cfg: ServiceConfig) -> AdapterLoader | None:
    urls = [u.strip() for u in (cfg.vllm_url or "").split(",") if u.strip()]
    if not urls:
        return None
    from trainer.service.vllm_admin import VllmAdmin, VllmReplicas

    if len(urls) == 1:
        return VllmAdmin(urls[0], cfg.vllm_admin_key)
    return VllmReplicas(urls, cfg.vllm_admin_key)  # behind a router: every replica told


def open_store(cfg: ServiceConfig, layout: Layout) -> Store:
    """The job store ``cfg`` names: PostgreSQL at its URL, else SQLite on the volume."""
    if cfg.job_store:
        from trainer.service.pgstore import PostgresStore  # psycopg only when asked for

        return PostgresStore(cfg.job_store)
    return SqliteStore(layout.db)


async def serve(
    cfg: ServiceConfig, ready: asyncio.Event | None = None, metrics_listen: str | None = None
) -> None:
    layout = Layout(cfg.data_dir).create()
    if swept := layout.sweep():  # half an upload or publish from a killed predecessor
        log.warning("removed %d unfinished upload(s)/publish(es): %s", len(swept), swept)
    store = open_store(cfg, layout)
    metrics = Metrics(store)
    # Job transitions are logged, curves recorded and ended jobs counted as events are stored.
    store.listen(JobObserver(store, layout, on_end=metrics.job_ended))
    assert cfg.tenants_file is not None
    tenants = tenant_registry(cfg.tenants_file, cfg.tenants_store)
    auth = Authenticator(tenants)
    bus = EventBus()
    adapters = adapter_store_from_url(cfg.adapter_store, layout, layout.adapter_cache)
    publisher = Publisher(adapters, store, cfg.max_lora_rank, _loader(cfg))
    files = job_files_from_url(cfg.job_files, layout)
    try:  # versions a killed publisher (here or on another host) left without a manifest
        if swept := await asyncio.to_thread(adapters.sweep_unfinished):
            log.warning("removed the files of %d unfinished version(s): %s", len(swept), swept)
    except Unavailable as e:  # storage down at start: the next start sweeps them
        log.warning("unfinished versions not swept: %s", e)
    budget = MemoryBudget.detect(cfg.gpu_memory_budget)
    if cfg.gpu_memory_budget is not None and budget is None:
        log.warning("no GPU found: the memory budget of %s is not checked", cfg.gpu_memory_budget)
    scheduler = Scheduler(
        store,
        layout,
        publisher,
        cfg.base_models,
        bus,
        cfg.devices,
        keep_checkpoints=cfg.keep_checkpoints,
        worker=cfg.worker_id or socket.gethostname(),
        lease_s=cfg.lease_seconds,
        publish_wait_s=cfg.publish_wait_seconds,
        memory_budget_bytes=budget.bytes if budget else 0,
        files=files,
    )
    meter = UsageMeter(store, adapters)
    quotas = Quotas(cfg.max_queued_jobs, cfg.max_stored_bytes)
    metrics.registry.register(UsageCollector(meter, lambda: [t.name for t in tenants.list()]))
    jobs = Jobs(
        store,
        scheduler,
        bus,
        cfg.base_models,
        cfg.max_lora_rank,
        budget,
        cfg.max_validations,
        meter,
        quotas,
    )
    datasets = DatasetIngest(
        store, layout, cfg.max_upload_bytes, cfg.min_examples, meter, quotas, files
    )

    server = grpc.aio.server(
        interceptors=[
            metrics.interceptor(),  # outermost: times and counts every answer, refusals too
            # Corrupt request bytes are the client's mistake: INVALID_ARGUMENT, not UNKNOWN.
            DecodeGuard(auth.tenant, STATUS),
        ],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    trainer_pb2_grpc.add_TrainerServicer_to_server(
        TrainerServicer(auth, store, datasets, jobs, publisher, meter, quotas), server
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(cfg.listen)
    if port == 0:
        raise SystemExit(f"cannot listen on {cfg.listen}")
    await scheduler.start()
    await server.start()
    for name in ("", SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    host = cfg.listen.rsplit(":", 1)[0]
    # The bound port on one line, so a supervisor (or a test) that asked for port 0 finds it.
    print(f"trainer listening on {host}:{port}", flush=True)
    log.info("serving %s on %s:%d, %d device slot(s)", SERVICE, host, port, scheduler.slots)
    if metrics_listen:
        m_host, m_port = metrics.serve(metrics_listen)
        print(f"metrics on http://{m_host}:{m_port}/metrics", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()

    log.info("stopping: no new calls, %ss for calls in flight", GRACE_S)
    await health.enter_graceful_shutdown()
    await server.stop(GRACE_S)
    await scheduler.stop()
    metrics.stop()
    store.close()
    log.info("stopped")
