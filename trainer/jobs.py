"""Jobs as tenants see them: create, read, cancel and follow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from trainer.config import JobConfig
from trainer.errors import AlreadyExists, InvalidArgument, NotFound
from trainer.memory import MemoryBudget
from trainer.names import check_id, check_name, fold
from trainer.scheduler import EventBus, Scheduler
from trainer.store import EventRecord, JobRecord, JobState, Store, new_id


class Jobs:
    def __init__(
        self,
        store: Store,
        scheduler: Scheduler,
        bus: EventBus,
        base_models: dict[str, str],
        max_lora_rank: int,
        memory: MemoryBudget | None = None,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.bus = bus
        self.base_models = base_models
        self.max_lora_rank = max_lora_rank
        self.memory = memory
        self._create_lock = asyncio.Lock()

    async def create(
        self, tenant: str, base_model: str, dataset_id: str, adapter_name: str, cfg: JobConfig
    ) -> JobRecord:
        if base_model not in self.base_models:
            raise InvalidArgument(
                "base_model",
                f"{base_model!r} is not served here; choose one of {sorted(self.base_models)}",
            )
        check_name(adapter_name, "adapter_name")
        check_id(dataset_id, "dataset_id")
        cfg.validate(self.max_lora_rank)
        if self.memory is not None:
            self.memory.check(self.base_models[base_model], cfg)
        ds = self.store.get_dataset(tenant, dataset_id)
        if ds is None:
            raise NotFound(f"dataset_id: dataset {dataset_id!r} not found")
        async with self._create_lock:  # the duplicate check and the insert are one step
            for j in self.store.list_jobs(tenant):
                if fold(j.adapter_name) == fold(adapter_name) and not j.state.terminal:
                    raise AlreadyExists(
                        f"adapter_name: job {j.id} for adapter {j.adapter_name!r} is "
                        f"{j.state.value}; wait for it or cancel it"
                    )
            rec = JobRecord(
                id=new_id("job"),
                tenant=tenant,
                base_model=base_model,
                dataset_id=ds.id,
                dataset_sha256=ds.sha256,
                adapter_name=adapter_name,
                config=cfg.to_dict(),
            )
            self.store.add_job(rec)
        self.store.append_event(rec.id, JobState.QUEUED, "queued")
        await self.bus.notify()
        self.scheduler.wake()
        return rec

    def get(self, tenant: str, job_id: str) -> JobRecord:
        check_id(job_id, "id")
        rec = self.store.get_job(tenant, job_id)
        if rec is None:
            raise NotFound(f"job {job_id!r} not found")
        return rec

    def list(self, tenant: str) -> list[JobRecord]:
        return self.store.list_jobs(tenant)

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        rec = self.get(tenant, job_id)
        if not rec.state.terminal:
            await self.scheduler.cancel(rec)
        return self.get(tenant, job_id)

    async def watch(self, tenant: str, job_id: str) -> AsyncIterator[EventRecord]:
        """Every past event, then live ones until the job has ended."""
        self.get(tenant, job_id)
        seq = 0
        while True:
            events = self.store.events_after(job_id, seq)
            for ev in events:
                seq = ev.seq
                yield ev
                if ev.state.terminal:
                    return
            if not events:
                job = self.store.get_job(tenant, job_id)
                if job is None or job.state.terminal:
                    return
                await self.bus.wait(timeout=2.0)
