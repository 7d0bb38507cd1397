"""Jobs as tenants see them: create, read, cancel and follow; validate a dataset for one;
export an adapter version merged into its base."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import uuid
from collections import Counter
from collections.abc import AsyncIterator

from trainer import events
from trainer.config import EvalSplit, JobConfig
from trainer.data.report import Report
from trainer.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from trainer.events import DatasetReport, Event, Failed
from trainer.layout import write_atomic
from trainer.memory import MemoryBudget
from trainer.names import check_id, check_name
from trainer.service.publish import check_version
from trainer.service.scheduler import EventBus, Scheduler, job_spec
from trainer.service.store import (
    DatasetRecord,
    EventRecord,
    JobKind,
    JobRecord,
    JobState,
    Store,
    new_id,
)
from trainer.service.usage import Quotas, UsageMeter

log = logging.getLogger(__name__)


class Jobs:
    def __init__(
        self,
        store: Store,
        scheduler: Scheduler,
        bus: EventBus,
        base_models: dict[str, str],
        max_lora_rank: int,
        memory: MemoryBudget | None,
        max_validations: int,
        meter: UsageMeter,
        quotas: Quotas,
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.bus = bus
        self.base_models = base_models
        self.max_lora_rank = max_lora_rank
        self.memory = memory
        self.max_validations = max_validations  # per tenant, at once
        self.meter = meter
        self.quotas = quotas
        self._validating: Counter[str] = Counter()

    def _draft(
        self,
        tenant: str,
        base_model: str,
        dataset_id: str,
        adapter_name: str,
        cfg: JobConfig,
        split: EvalSplit,
    ) -> JobRecord:
        """A job record for these arguments, every argument checked; nothing stored."""
        if base_model not in self.base_models:
            raise InvalidArgument(
                "base_model",
                f"{base_model!r} is not served here; choose one of {sorted(self.base_models)}",
            )
        check_name(adapter_name, "adapter_name")
        check_id(dataset_id, "dataset_id")
        cfg.validate(self.max_lora_rank)
        split.validate()
        if self.memory is not None:
            self.memory.check(self.base_models[base_model], cfg)
        ds = self._dataset(tenant, dataset_id, "dataset_id")
        val: DatasetRecord | None = None
        if split.validation_dataset_id:
            val = self._dataset(tenant, split.validation_dataset_id, "validation_dataset_id")
            if val.format != ds.format:
                raise InvalidArgument(
                    "validation_dataset_id",
                    f"its format is {val.format}, the training dataset's is {ds.format}",
                )
        return JobRecord(
            id=new_id("job"),
            tenant=tenant,
            base_model=base_model,
            dataset_id=ds.id,
            dataset_sha256=ds.sha256,
            adapter_name=adapter_name,
            config=cfg.to_dict(),
            validation_dataset_id=val.id if val else "",
            validation_sha256=val.sha256 if val else "",
            eval_fraction=split.fraction,
        )

    def _dataset(self, tenant: str, dataset_id: str, field: str) -> DatasetRecord:
        check_id(dataset_id, field)
        ds = self.store.get_dataset(tenant, dataset_id)
        if ds is None:
            raise NotFound(f"{field}: dataset {dataset_id!r} not found")
        return ds

    async def create(
        self,
        tenant: str,
        base_model: str,
        dataset_id: str,
        adapter_name: str,
        cfg: JobConfig,
        split: EvalSplit | None = None,
        request_id: str = "",
    ) -> JobRecord:
        if earlier := self._retried(tenant, request_id):
            return earlier
        rec = self._draft(tenant, base_model, dataset_id, adapter_name, cfg, split or EvalSplit())
        rec.request_id = request_id
        return await self._queue(rec)

    def _retried(self, tenant: str, request_id: str) -> JobRecord | None:
        """The job a call with this ``request_id`` created already, if any."""
        if not request_id:
            return None
        check_name(request_id, "request_id")
        return self.store.find_job_by_request(tenant, request_id)

    async def _queue(self, rec: JobRecord) -> JobRecord:
        self.quotas.check_job(self.meter, rec.tenant)
        # Refused if the name has an active job, checked there at once; a concurrent retry
        # of the same request gets the job the first one stored.
        stored = self.store.add_job(rec)
        if stored.id != rec.id:
            return stored
        self.store.append_event(rec.id, JobState.QUEUED, "queued")
        await self.bus.notify()
        self.scheduler.wake()
        return rec

    async def export(self, tenant: str, adapter_ref: str, request_id: str = "") -> JobRecord:
        """Queue a MERGE_EXPORT job for ``<adapter>`` (the version served) or
        ``<adapter>@vNNNN``."""
        if earlier := self._retried(tenant, request_id):
            return earlier
        name, _, version = adapter_ref.partition("@")
        check_name(name, "adapter")
        adapters = self.scheduler.publisher.adapters
        if version:
            check_version(version)
        else:
            version = adapters.current(tenant, name) or ""
        manifest = adapters.manifest(tenant, name, version) if version else None
        if manifest is None:
            raise NotFound(f"adapter: {adapter_ref!r} not found")
        base_model = manifest.get("base_model", "")
        if base_model not in self.base_models:
            raise FailedPrecondition(
                f"adapter: its base model {base_model!r} is no longer served here"
            )
        rec = JobRecord(
            id=new_id("job"),
            tenant=tenant,
            base_model=base_model,
            dataset_id="",
            dataset_sha256="",
            adapter_name=name,
            config={},
            kind=JobKind.MERGE_EXPORT,
            adapter_version=version,
            request_id=request_id,
        )
        return await self._queue(rec)

    async def delete_export(self, tenant: str, job_id: str) -> None:
        """Free a merged export's bytes (the job stays, with no bytes to download)."""
        job = self.get(tenant, job_id)
        if job.kind != JobKind.MERGE_EXPORT:
            raise InvalidArgument("job_id", f"job {job_id} is not a merged export")
        if not job.state.terminal:
            raise FailedPrecondition(f"job {job_id} is {job.state}; cancel it first")
        folder = self.scheduler.layout.export_dir(tenant, job_id)
        trash = self.scheduler.layout.export_staging / f"deleted-{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            folder.rename(trash)
            await asyncio.to_thread(shutil.rmtree, trash, True)
        self.store.update_job(job_id, export_size_bytes=0)

    async def validate(
        self, tenant: str, base_model: str, dataset_id: str, cfg: JobConfig, split: EvalSplit
    ) -> Report:
        """The report the job would compute in VALIDATING, from a subprocess; nothing stored.

        Tokenizing a large file is CPU-bound for minutes: a subprocess keeps the event
        loop and the service's memory free of it, and is killed if the caller goes away.
        Each subprocess holds ~400 MiB, so a tenant may run ``max_validations`` at once;
        one more is refused (RESOURCE_EXHAUSTED) rather than queued without bound.
        """
        draft = self._draft(tenant, base_model, dataset_id, "validate", cfg, split)
        # No await between the check and the count: one event loop makes them one step.
        if self._validating[tenant] >= self.max_validations:
            raise ResourceExhausted(
                f"this tenant has {self._validating[tenant]} ValidateDataset call(s) running, "
                "the most allowed at once; try again when one has finished"
            )
        self._validating[tenant] += 1
        try:
            return await self._validate(tenant, draft)
        finally:
            self._validating[tenant] -= 1
            if not self._validating[tenant]:
                del self._validating[tenant]

    async def _validate(self, tenant: str, draft: JobRecord) -> Report:
        base_model = draft.base_model
        layout = self.scheduler.layout
        await self.scheduler.fetch_datasets(draft)  # uploaded through another front-end
        spec = job_spec(self.store, layout, draft, self.base_models[base_model])
        spec_file, log_file = (layout.tmp / f"validate-{draft.id}.{x}" for x in ("json", "log"))
        write_atomic(spec_file, json.dumps(spec.to_dict()).encode())
        answer: list[Event] = []
        try:
            run = await self.scheduler.runner.validate(
                spec_file, packing=bool(self.scheduler.gpus and spec.fast_path), log=log_file
            )
            try:
                answer = [ev async for ev in run.events()][-1:]  # the last event answers
                await run.wait()
            finally:
                if run.process.returncode is None:  # the call was cancelled
                    await run.stop(grace_s=0)
            output = log_file.read_text(errors="replace").strip()
        finally:
            for f in (spec_file, log_file):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
        match answer[0] if answer else None:
            case DatasetReport() as report:
                return Report.from_dict(report.report)
            case Failed(kind=events.PRECONDITION) as failed:
                # The tenant's message names the base model, not its folder; the log has both.
                log.warning(
                    "validating for %s on base model %r (%s): %s\n%s",
                    tenant, base_model, spec.base_model_path, failed.message, output[-4000:],
                )  # fmt: skip
                raise FailedPrecondition(failed.message)
            case Failed() as failed:
                raise InvalidArgument("dataset", failed.message.removeprefix("dataset: "))
        tail = output.splitlines()[-1:]
        raise RuntimeError(f"validation failed: {' '.join(tail)}")

    def get(self, tenant: str, job_id: str) -> JobRecord:
        check_id(job_id, "id")
        rec = self.store.get_job(tenant, job_id)
        if rec is None:
            raise NotFound(f"job {job_id!r} not found")
        return rec

    def list(
        self, tenant: str, states: tuple[JobState, ...] = (), adapter_name: str = ""
    ) -> list[JobRecord]:
        if adapter_name:
            check_name(adapter_name, "adapter_name")
        return self.store.list_jobs(tenant, states, adapter_name or None)

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
