"""Prometheus metrics of the trainer, served on their own HTTP port.

``python -m trainer serve --metrics-listen 127.0.0.1:9464`` (env FINETUNE_METRICS_LISTEN;
off unless given) serves ``/metrics``:

    finetune_jobs{state}                          jobs in the store, by state
    finetune_queue_length{tenant}                 QUEUED jobs of each tenant
    finetune_job_tokens_per_second{tenant,job_id} the running jobs' latest throughput
    finetune_job_step{tenant,job_id}              their optimizer step ...
    finetune_job_total_steps{tenant,job_id}       ... out of this many
    finetune_job_peak_memory_bytes{tenant,job_id} GPU peak allocated (peak RSS on CPU)
    finetune_gpu_memory_used_bytes{gpu}           from NVML; absent without a GPU
    finetune_upload_bytes_total                   dataset bytes received
    finetune_rpc_duration_seconds{method,code}    a histogram of every RPC (and its count)

Job figures are read from the store when scraped, so they are never stale and need no
bookkeeping; RPCs are timed by a ``grpc.aio`` server interceptor.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from trainer.memory import gpu_memory
from trainer.service.store import JobState, Store

RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


ACTIVE = (JobState.QUEUED, JobState.VALIDATING, JobState.RUNNING)
ENDED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class StoreCollector(Collector):
    """Job figures from the job store, read at each scrape.

    Jobs not yet ended are read from the store each time (few, and found by its state
    index); ended jobs, which only grow, are counted once at start and then as they end,
    so a scrape stays cheap with many thousands of jobs behind it.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._ended: dict[JobState, int] = dict.fromkeys(ENDED, 0)
        self._counted: set[str] = set()
        for job in store.jobs_in_states(*ENDED):
            self._ended[job.state] += 1
            self._counted.add(job.id)

    def job_ended(self, job_id: str, state: JobState) -> None:
        """A job reached ``state`` (SUCCEEDED, FAILED or CANCELLED); each job counts once."""
        with self._lock:
            if state in self._ended and job_id not in self._counted:
                self._counted.add(job_id)
                self._ended[state] += 1

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = self.store.jobs_in_states(*ACTIVE)
        by_state = GaugeMetricFamily(
            "finetune_jobs", "Jobs in the store, by state", labels=["state"]
        )
        with self._lock:
            ended = dict(self._ended)
        for state in JobState:
            n = ended[state] if state in ended else sum(j.state is state for j in jobs)
            by_state.add_metric([state.value], n)
        yield by_state

        queue = GaugeMetricFamily(
            "finetune_queue_length", "Jobs waiting to start, by tenant", labels=["tenant"]
        )
        waiting: dict[str, int] = {}
        for j in jobs:
            if j.state is JobState.QUEUED:
                waiting[j.tenant] = waiting.get(j.tenant, 0) + 1
        for tenant, n in sorted(waiting.items()):
            queue.add_metric([tenant], n)
        yield queue

        labels = ["tenant", "job_id"]
        figures = {
            "tokens_per_second": GaugeMetricFamily(
                "finetune_job_tokens_per_second",
                "Training throughput of a running job (its latest progress event)",
                labels=labels,
            ),
            "step": GaugeMetricFamily(
                "finetune_job_step", "Optimizer steps done by a running job", labels=labels
            ),
            "total_steps": GaugeMetricFamily(
                "finetune_job_total_steps", "Optimizer steps a running job will run", labels=labels
            ),
            "peak_memory_bytes": GaugeMetricFamily(
                "finetune_job_peak_memory_bytes",
                "Peak GPU memory allocated by a running job (peak RSS on a CPU)",
                labels=labels,
            ),
        }
        for j in jobs:
            if not j.state.active or not j.progress:
                continue
            for key, family in figures.items():
                value = j.progress.get(key)
                if isinstance(value, int | float):
                    family.add_metric([j.tenant, j.id], float(value))
        yield from figures.values()

        gpus = gpu_memory_used()
        if gpus:
            used = GaugeMetricFamily(
                "finetune_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"]
            )
            for index, value in gpus.items():
                used.add_metric([str(index)], value)
            yield used


_gpu_cache: tuple[float, dict[int, int]] = (0.0, {})
_gpu_lock = threading.Lock()


def gpu_memory_used(max_age_s: float = 5.0) -> dict[int, int]:
    """Bytes in use on each GPU (every process, vLLM too), read through NVML and kept for
    ``max_age_s``; {} without a GPU or its driver."""
    global _gpu_cache
    with _gpu_lock:
        at, value = _gpu_cache
        if time.monotonic() - at < max_age_s:
            return value
        value = {index: gpu.used for index, gpu in gpu_memory().items()}
        _gpu_cache = (time.monotonic(), value)
        return value


class Metrics:
    """The trainer's registry: the store's figures, RPC timings and upload bytes."""

    def __init__(self, store: Store) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.jobs = StoreCollector(store)
        self.registry.register(self.jobs)
        self.rpc = Histogram(
            "finetune_rpc_duration_seconds",
            "Time to answer an RPC (a stream: until it ends), by method and status code",
            ["method", "code"],
            buckets=RPC_BUCKETS,
            registry=self.registry,
        )
        self.upload_bytes = Counter(
            "finetune_upload_bytes",
            "Dataset bytes received (uploads refused part-way included)",
            registry=self.registry,
        )
        self._http: Any = None

    def job_ended(self, job_id: str, state: JobState) -> None:
        self.jobs.job_ended(job_id, state)

    def interceptor(self) -> RpcMetrics:
        return RpcMetrics(self)

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve ``/metrics`` on ``host:port`` (port 0 picks one); return where it listens."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        self._http, _ = start_http_server(int(port), addr=host, registry=self.registry)
        return host, self._http.server_port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "UNKNOWN"


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Times every RPC by method and final status code; counts upload bytes."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        observe = self.m.rpc

        def done(context: grpc.aio.ServicerContext, start: float, error: BaseException | None):
            observe.labels(method, _code(context, error)).observe(time.perf_counter() - start)

        def wrap_requests(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            if method != "UploadDataset":
                return requests

            async def counted() -> AsyncIterator[Any]:
                async for req in requests:
                    if req.WhichOneof("part") == "chunk":
                        self.m.upload_bytes.inc(len(req.chunk))
                    yield req

            return counted()

        kinds = {
            "unary_unary": grpc.unary_unary_rpc_method_handler,
            "unary_stream": grpc.unary_stream_rpc_method_handler,
            "stream_unary": grpc.stream_unary_rpc_method_handler,
            "stream_stream": grpc.stream_stream_rpc_method_handler,
        }
        kind = next(k for k in kinds if getattr(handler, k) is not None)
        inner = getattr(handler, kind)
        streaming_in = kind.startswith("stream_")

        if inspect.isasyncgenfunction(inner):

            async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start, error = time.perf_counter(), None
                try:
                    arg = wrap_requests(request) if streaming_in else request
                    async for item in inner(arg, context):
                        yield item
                except BaseException as e:
                    error = e
                    raise
                finally:
                    done(context, start, error)

        else:  # a coroutine: returns the answer, or streams with context.write()

            async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:  # type: ignore[misc]
                start, error = time.perf_counter(), None
                try:
                    arg = wrap_requests(request) if streaming_in else request
                    return await inner(arg, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    done(context, start, error)

        return kinds[kind](
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
