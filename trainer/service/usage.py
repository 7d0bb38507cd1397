"""What each tenant has used and stores, and the quotas that bound it.

Figures come from the job store (jobs, datasets, exports) and the adapter store (the bytes
of every version held), computed when asked: ``GetUsage``, the ``finetune usage`` table and
the Prometheus series (``UsageCollector``) read the same ``TenantUsage``. Quotas are checked
before anything is stored, so a refused call leaves nothing behind.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from trainer.adapter_store import AdapterStore
from trainer.errors import ResourceExhausted
from trainer.service.store import JobRecord, JobState, Store

UNFINISHED = (JobState.QUEUED, JobState.VALIDATING, JobState.RUNNING)


@dataclass
class TenantUsage:
    tenant: str
    tokens_trained: int = 0
    gpu_seconds: float = 0.0
    jobs_by_state: dict[str, int] = field(default_factory=dict)
    dataset_bytes: int = 0
    adapter_bytes: int = 0
    export_bytes: int = 0

    @property
    def stored_bytes(self) -> int:
        return self.dataset_bytes + self.adapter_bytes + self.export_bytes


def tokens_trained(job: JobRecord) -> int:
    """Tokens a job has trained: its final count, or while it runs (or after it stopped
    early) the report's total times the share of steps done."""
    if job.metrics and "tokens_trained" in job.metrics:
        return int(job.metrics["tokens_trained"])
    total = (job.report or {}).get("train_tokens", 0)
    step, steps = (job.progress or {}).get("step", 0), (job.progress or {}).get("total_steps", 0)
    return round(total * step / steps) if steps else 0


def device_seconds(job: JobRecord, now: float) -> float:
    """Seconds a job has held its device: from its first start to its end (or now)."""
    if job.started_at is None or job.state == JobState.QUEUED:
        return 0.0
    return max(0.0, (job.finished_at or now) - job.started_at)


class UsageMeter:
    def __init__(self, store: Store, adapters: AdapterStore) -> None:
        self.store = store
        self.adapters = adapters

    def usage(self, tenant: str) -> TenantUsage:
        now = time.time()
        jobs = self.store.list_jobs(tenant)
        adapter_bytes = sum(
            self.adapters.size(tenant, name, version)
            for name in self.adapters.names(tenant)
            for version in self.adapters.versions(tenant, name)
        )
        return TenantUsage(
            tenant=tenant,
            tokens_trained=sum(tokens_trained(j) for j in jobs),
            gpu_seconds=sum(device_seconds(j, now) for j in jobs),
            jobs_by_state=dict(Counter(j.state.value for j in jobs)),
            dataset_bytes=sum(d.size_bytes for d in self.store.list_datasets(tenant)),
            adapter_bytes=adapter_bytes,
            export_bytes=sum(j.export_size_bytes for j in jobs),
        )


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits (0: none), from the service's flags."""

    max_queued_jobs: int
    max_stored_bytes: int

    def check_job(self, meter: UsageMeter, tenant: str) -> None:
        """Refuse one more job when the tenant's unfinished ones are at the limit, or its
        bytes stored already are."""
        if self.max_queued_jobs:
            unfinished = len(meter.store.list_jobs(tenant, states=UNFINISHED))
            if unfinished >= self.max_queued_jobs:
                raise ResourceExhausted(
                    f"max_queued_jobs: this tenant has {unfinished} unfinished job(s), the "
                    f"most allowed ({self.max_queued_jobs}); wait for one to end or cancel one"
                )
        self.check_bytes(meter, tenant, 0)

    def room(self, meter: UsageMeter, tenant: str) -> int | None:
        """Bytes the tenant may still store, or None without a limit."""
        if not self.max_stored_bytes:
            return None
        return max(0, self.max_stored_bytes - meter.usage(tenant).stored_bytes)

    def check_bytes(self, meter: UsageMeter, tenant: str, incoming: int) -> None:
        room = self.room(meter, tenant)
        if room is not None and (incoming > room or room == 0):
            raise self.exceeded(meter, tenant)

    def exceeded(self, meter: UsageMeter, tenant: str) -> ResourceExhausted:
        stored = meter.usage(tenant).stored_bytes
        return ResourceExhausted(
            f"max_stored_bytes: this tenant stores {stored} bytes of the {self.max_stored_bytes} "
            "allowed; delete datasets, adapter versions or exports first"
        )


class UsageCollector(Collector):
    """Each tenant's usage as Prometheus series, read at scrape time."""

    def __init__(self, meter: UsageMeter, tenants: Callable[[], list[str]]) -> None:
        self.meter = meter
        self.tenants = tenants

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        tokens = CounterMetricFamily(
            "finetune_tenant_tokens_trained",
            "Tokens trained by a tenant's jobs.",
            labels=["tenant"],
        )
        seconds = CounterMetricFamily(
            "finetune_tenant_device_seconds",
            "Seconds a tenant's jobs held a device (GPU, or CPU on a CPU host).",
            labels=["tenant"],
        )
        stored = GaugeMetricFamily(
            "finetune_tenant_stored_bytes",
            "Bytes a tenant stores, by kind (dataset, adapter, export).",
            labels=["tenant", "kind"],
        )
        jobs = GaugeMetricFamily(
            "finetune_tenant_jobs", "A tenant's jobs by state.", labels=["tenant", "state"]
        )
        for tenant in self.tenants():
            u = self.meter.usage(tenant)
            tokens.add_metric([tenant], u.tokens_trained)
            seconds.add_metric([tenant], u.gpu_seconds)
            for kind, value in (
                ("dataset", u.dataset_bytes),
                ("adapter", u.adapter_bytes),
                ("export", u.export_bytes),
            ):
                stored.add_metric([tenant, kind], value)
            for state in JobState:
                jobs.add_metric([tenant, state.value], u.jobs_by_state.get(state.value, 0))
        yield from (tokens, seconds, stored, jobs)
