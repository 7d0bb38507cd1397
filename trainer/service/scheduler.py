"""The scheduler: one training subprocess per device, FIFO within a tenant, fair across tenants.

The store picks each job (``Store.claim_next``); the runner runs it (``trainer.service.runner``:
today ``python -m trainer.training.worker spec.json`` in a process group of its own, so a crash, an
out-of-memory kill or a cancel ends the job and frees its memory without touching the
service). The worker's events (``trainer.events``) become the job's events in the store,
which ``WatchJob`` replays and follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import JobConfig, JobSpec
from trainer.data.report import Report
from trainer.errors import Unavailable
from trainer.events import USER, Checkpoint, DatasetReport, Done, Failed, Progress, State
from trainer.job_files import JobFiles, LocalJobFiles
from trainer.layout import JobFolder, Layout, write_atomic
from trainer.service import curves
from trainer.service.publish import AdapterRejected, AdapterStorageDown, Publisher
from trainer.service.runner import JobRunner, LocalRunner, Run
from trainer.service.store import ErrorKind, EventRecord, JobKind, JobRecord, JobState, Store
from trainer.training.worker import EXIT_USER

log = logging.getLogger(__name__)

KILL_GRACE_S = 10.0


def count_devices() -> int:
    """GPUs visible to this process (without importing torch), or 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len([p for p in os.listdir("/proc/driver/nvidia/gpus")])
    except OSError:
        return 0


class EventBus:
    """Wakes ``WatchJob`` streams when any job gets a new event."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()

    async def notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait(self, timeout: float) -> None:
        async with self._cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cond.wait(), timeout)


@dataclass
class _Running:
    job: JobRecord  # as claimed: its attempt fences every write for it
    slot: int
    run: Run
    cancelled: bool = False
    fenced: bool = False  # another claim (or a cancel) took the job: write nothing more
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    saved_step: int = 0  # the newest checkpoint the run saved
    keeper: asyncio.Task[None] | None = field(default=None, repr=False)  # uploads them


def job_spec(
    store: Store, layout: Layout, job: JobRecord, base_path: str, memory_budget_bytes: int = 0
) -> JobSpec:
    """What a training subprocess (or a validation run, or an export) needs to know; it
    works in the folder of the job's attempt, within the trainer's GPU memory budget."""
    job_dir = str(layout.attempt(job.id, job.attempt).root)
    if job.kind == JobKind.MERGE_EXPORT:
        return JobSpec(
            job_id=job.id,
            base_model=job.base_model,
            base_model_path=base_path,
            dataset_path="",
            job_dir=job_dir,
            adapter_path=str(layout.version_dir(job.tenant, job.adapter_name, job.adapter_version)),
            export_dir=str(layout.export_dir(job.tenant, job.id)),
        )
    ds = store.get_dataset(job.tenant, job.dataset_id)
    return JobSpec(
        job_id=job.id,
        base_model=job.base_model,
        base_model_path=base_path,
        dataset_path=str(layout.dataset_file(job.dataset_sha256)),
        job_dir=job_dir,
        config=JobConfig.from_dict(job.config),
        dataset_format=ds.format if ds else "",
        dataset_examples=ds.num_rows if ds else 0,
        eval_dataset_path=(
            str(layout.dataset_file(job.validation_sha256)) if job.validation_sha256 else ""
        ),
        eval_fraction=job.eval_fraction,
        memory_budget_bytes=memory_budget_bytes,
    )


class Fenced(Exception):
    """This worker's claim on the job lapsed and another claim (or a cancel) took it."""


class Scheduler:
    """Runs claimed jobs on this host's devices, holding each claim by a lease.

    Each claim carries an attempt number; every write this scheduler makes for the job is
    fenced by it (``Store.update_job_fenced``), and a heartbeat renews the lease while the
    job runs. When a renewal or a write is refused, another worker (after this one stopped
    or paused past the lease) or a cancel has the job now: its run here is killed and
    nothing more is written. A later attempt works in a folder of its own
    (``Layout.attempt``), seeded with the newest checkpoint any attempt left.
    """

    def __init__(
        self,
        store: Store,
        layout: Layout,
        publisher: Publisher,
        base_models: dict[str, str],
        bus: EventBus,
        devices: int | None = None,
        runner: JobRunner | None = None,
        *,
        keep_checkpoints: bool,
        worker: str,
        lease_s: float,
        publish_wait_s: float,
        memory_budget_bytes: int = 0,
        files: JobFiles | None = None,
    ) -> None:
        self.files = files or LocalJobFiles(layout)
        self.keep_checkpoints = keep_checkpoints
        self.publish_wait_s = publish_wait_s
        self.memory_budget_bytes = memory_budget_bytes  # 0: none set
        self.worker = worker
        self.lease_s = lease_s
        self.store = store
        self.runner = runner or LocalRunner()
        self.layout = layout
        self.publisher = publisher
        self.base_models = base_models
        self.bus = bus
        self.gpus = count_devices()
        self.slots = devices or max(self.gpus, 1)
        self._running: dict[str, _Running] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._reapers: set[asyncio.Task[None]] = set()
        self._stopping = False

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._recover()
        await self.publisher.sweep()
        self._loop_task = asyncio.create_task(self._loop(), name="scheduler")
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="heartbeat")

    async def stop(self) -> None:
        """Stop for a restart: running jobs go back to the queue and resume later."""
        self._stopping = True
        for task in (self._loop_task, self._heartbeat_task):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for run in list(self._running.values()):
            self._kill(run)
        for run in list(self._running.values()):
            if run.task:
                with contextlib.suppress(asyncio.CancelledError):
                    await run.task

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------ fenced writes
    def _write(self, job: JobRecord, **fields: Any) -> None:
        if not self.store.update_job_fenced(job.id, job.attempt, **fields):
            raise Fenced(job.id)

    async def _event(
        self, job: JobRecord, state: JobState, message: str, progress: dict | None = None
    ) -> EventRecord:
        ev = self.store.append_event_fenced(job.id, job.attempt, state, message, progress)
        if ev is None:
            raise Fenced(job.id)
        await self.bus.notify()
        return ev

    async def _finish(
        self, job: JobRecord, state: JobState, message: str, kind: ErrorKind = ErrorKind.NONE
    ) -> None:
        fields: dict[str, Any] = {"state": state, "finished_at": time.time(), "pid": None}
        log.info("job %s %s: %s", job.id, state.value, message)
        message = self._redact(message)
        if state is not JobState.SUCCEEDED:
            fields.update(error_kind=kind, error_message=message)
        self._write(job, **fields)
        await self._event(job, state, message)

    def _redact(self, message: str) -> str:
        """The tenant's copy of a message: the server's folders named, not shown.

        A worker's exception text can hold the base model's or the data dir's path; the
        log keeps the full text for the operator.
        """
        names: dict[str, str] = {}
        for name, path in self.base_models.items():
            for p in {path, os.path.realpath(path)}:
                if os.sep in p:
                    names[p.rstrip(os.sep)] = f"<base model {name}>"
        for p in {str(self.layout.root), os.path.realpath(self.layout.root)}:
            names[p.rstrip(os.sep)] = "DATA"
        for path in sorted(names, key=len, reverse=True):  # the longest, most specific first
            if path:
                message = message.replace(path, names[path])
        return message

    async def _recover(self) -> None:
        """After a restart: a job this worker held resumes from its checkpoint or fails.
        Jobs other workers hold are theirs; if one of them died, its lease lapses and a
        claim takes the job over."""
        for job in self.store.jobs_in_states(JobState.VALIDATING, JobState.RUNNING):
            if job.worker not in ("", self.worker):
                continue
            try:
                await self._recover_one(job)
            except Fenced:
                log.info("job %s was claimed by another worker meanwhile", job.id)

    async def _recover_one(self, job: JobRecord) -> None:
        if job.pid:
            _kill_group_of(job.pid, job.id)
        ckpt = self.layout.resume_point(job.id)
        if job.kind == JobKind.MERGE_EXPORT:  # exports start over: nothing is half-kept
            self._write(job, state=JobState.QUEUED, pid=None)
            await self._event(job, JobState.QUEUED, "the service restarted; queued again")
        elif job.pid is None and ckpt is None:  # claimed, but its worker never started
            self._write(job, state=JobState.QUEUED)
            await self._event(job, JobState.QUEUED, "the service restarted; queued again")
        elif ckpt is not None:
            self._write(job, state=JobState.QUEUED, pid=None)
            await self._event(
                job,
                JobState.QUEUED,
                f"the service restarted; the job will resume from {ckpt.name}",
            )
        else:
            await self._finish(
                job,
                JobState.FAILED,
                "the service stopped while this job ran, before its first checkpoint; "
                "create the job again",
                ErrorKind.SYSTEM,
            )

    # ------------------------------------------------------------ queue
    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            # The store picks the job, fairly, and takes it off the queue in one step.
            while len(self._running) < self.slots and (
                job := self.store.claim_next(self.worker, self.lease_s)
            ):
                stale = self._running.get(job.id)
                if stale is not None:  # ours, lapsed while this process was paused
                    await self._drop(stale, "its lease lapsed")
                busy = {r.slot for r in self._running.values()}
                slot = next(s for s in range(self.slots) if s not in busy)
                try:
                    await self._launch(job, slot)
                except Fenced:
                    log.warning("job %s was taken over before it started here", job.id)
                except Unavailable as e:  # its files are in storage that did not answer
                    log.warning("job %s could not start: %s; queued again", job.id, e)
                    with contextlib.suppress(Fenced):
                        self._write(job, state=JobState.QUEUED, pid=None)
                        await self._event(job, JobState.QUEUED, "object storage did not "
                                          "answer while the job started; queued again")  # fmt: skip
                    break  # the queue is tried again in a while, not at once
                except Exception as e:  # a broken job must not stop the queue
                    log.exception("could not start job %s", job.id)
                    with contextlib.suppress(Fenced):
                        await self._finish(
                            job, JobState.FAILED, f"could not start: {e}", ErrorKind.SYSTEM
                        )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=5.0)

    async def _heartbeat(self) -> None:
        """Renew the lease of every job running here; drop those another claim took."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            for run in list(self._running.values()):
                try:
                    held = self.store.renew_lease(run.job.id, run.job.attempt, self.lease_s)
                except Exception as e:  # the store is away: try again on the next beat
                    log.warning("renewing the lease of job %s failed: %s", run.job.id, e)
                    continue
                if not held:
                    await self._drop(run, "another claim or a cancel took it")

    async def _drop(self, run: _Running, why: str) -> None:
        """Stop a run whose claim this worker lost; write nothing more for it."""
        log.warning("job %s (attempt %d) is not this worker's any more (%s): stopping its run",
                    run.job.id, run.job.attempt, why)  # fmt: skip
        run.fenced = True
        self._kill(run)
        if run.task:
            await asyncio.shield(run.task)

    # ------------------------------------------------------------ running a job
    async def _launch(self, job: JobRecord, slot: int) -> None:
        folder = self.layout.attempt(job.id, job.attempt)
        folder.root.mkdir(parents=True, exist_ok=True)
        base_path = self.base_models.get(job.base_model)
        if base_path is None:
            await self._finish(
                job,
                JobState.FAILED,
                f"base model {job.base_model!r} is no longer served",
                ErrorKind.USER,
            )
            return
        await self.fetch_datasets(job)
        resumed = await asyncio.to_thread(self._seed, job, folder)
        spec = job_spec(self.store, self.layout, job, base_path, self.memory_budget_bytes)
        write_atomic(folder.spec, json.dumps(spec.to_dict(), indent=2).encode())
        start = self.runner.export if job.kind == JobKind.MERGE_EXPORT else self.runner.train
        run = await start(folder.spec, folder.log, slot if self.gpus else None)
        running = self._running[job.id] = _Running(job, slot, run)
        device = f"cuda:{slot}" if self.gpus else "cpu"
        log.info("job %s of %s started on %s (pid %d, attempt %d)",
                 job.id, job.tenant, device, run.pid, job.attempt)  # fmt: skip
        try:
            self._write(job, pid=run.pid)
            where = f"started on {device}" + (f" of {self.worker}" if self.worker else "")
            if job.attempt > 1:
                where += f", attempt {job.attempt}" + (f", from {resumed}" if resumed else "")
            await self._event(job, JobState.VALIDATING, where)
        except Fenced:
            self._running.pop(job.id, None)
            self._kill(running)
            raise
        running.task = asyncio.create_task(self._supervise(running), name=f"job-{job.id}")

    async def fetch_datasets(self, job: JobRecord) -> None:
        """The job's datasets on this host: here already, or fetched from where the
        front-end that received them kept them (``--job-files``)."""
        for sha256 in (job.dataset_sha256, job.validation_sha256):
            if sha256:
                await asyncio.to_thread(self.files.dataset, sha256)

    def _seed(self, job: JobRecord, folder: JobFolder) -> str:
        """A later attempt starts from the newest checkpoint an earlier one left, linked
        into its own folder (checkpoints are never written again once whole), or fetched
        from object storage where that one is newer (an attempt on another host); its name."""
        if job.attempt <= 1 or job.kind != JobKind.FINE_TUNE:
            return ""
        ckpt = self.layout.resume_point(job.id)
        kept = self.files.newest_checkpoint(job.id)
        if kept is not None and (ckpt is None or kept.step > _step(ckpt)):
            return self.files.fetch_checkpoint(job.id, kept, folder.checkpoints).name
        if ckpt is None or ckpt.parent == folder.checkpoints:
            return ckpt.name if ckpt else ""
        target = folder.checkpoints / ckpt.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(ckpt, target, copy_function=_link_or_copy)
        return ckpt.name

    async def _supervise(self, run: _Running) -> None:
        job = run.job
        state = JobState.VALIDATING
        error: Failed | None = None
        metrics: dict[str, Any] | None = None
        latest: dict[str, Any] = dict(job.progress or {})
        try:
            async for ev in run.run.events():
                match ev:
                    case State():
                        state = JobState(ev.state)
                        self._write(job, state=state)
                        await self._event(job, state, ev.message)
                    case Progress():
                        progress = ev.figures()
                        # An evaluation reports eval_loss alone: the job keeps the latest of each.
                        latest = {**latest, **progress}
                        self._write(job, progress=latest)
                        await self._event(job, state, "progress", progress)
                    case DatasetReport():
                        self._write(job, report=ev.report)
                        await self._event(job, state, Report.from_dict(ev.report).summary())
                    case Checkpoint():
                        await self._event(job, state, f"checkpoint saved at step {ev.step}")
                        if self.files.shared:
                            self._keep_checkpoint(run, ev.step)
                    case Done():
                        metrics = ev.metrics
                    case Failed():
                        error = ev
            rc = await run.run.wait()
            if run.keeper is not None:  # its last upload ends before the job does
                await asyncio.gather(run.keeper, return_exceptions=True)
            if not run.fenced:
                await self._conclude(run, rc, metrics, error)
        except asyncio.CancelledError:
            self._kill(run)
            raise
        except Fenced:
            log.warning("job %s was taken over; its run here is stopped", job.id)
            run.fenced = True
            self._kill(run)
        except Exception as e:
            log.exception("supervising job %s failed", job.id)
            with contextlib.suppress(Fenced):
                await self._finish(job, JobState.FAILED, f"internal error: {e}", ErrorKind.SYSTEM)
        finally:
            if self._running.get(job.id) is run:
                self._running.pop(job.id)
            self.wake()

    def _keep_checkpoint(self, run: _Running, step: int) -> None:
        """Upload the run's newest checkpoint in the background, one at a time: a
        checkpoint saved while another uploads is the next one kept (those between are
        skipped; the Trainer may have removed them already)."""
        run.saved_step = step
        if run.keeper is None or run.keeper.done():
            run.keeper = asyncio.create_task(self._keeper(run), name=f"keep-{run.job.id}")

    async def _keeper(self, run: _Running) -> None:
        job, kept = run.job, 0
        folder = self.layout.attempt(job.id, job.attempt)
        while run.saved_step > kept and not run.fenced:
            kept = run.saved_step
            ckpt = folder.checkpoints / f"checkpoint-{kept}"
            try:
                await asyncio.to_thread(self.files.keep_checkpoint, job.id, job.attempt, ckpt)
                message = f"checkpoint-{kept} kept in object storage"
                await self._event(job, JobState.RUNNING, message)
            except (Unavailable, OSError) as e:  # the next checkpoint tries again
                log.warning("job %s: checkpoint-%d not kept: %s", job.id, kept, e)
            except Fenced:
                return

    async def _conclude(
        self, run: _Running, rc: int, metrics: dict[str, Any] | None, error: Failed | None
    ) -> None:
        job = run.job
        if run.cancelled:
            await self._finish(job, JobState.CANCELLED, "cancelled")
            return
        if self._stopping:
            # The service is shutting down: back to the queue, resumed on the next start.
            self._write(job, state=JobState.QUEUED, pid=None)
            await self._event(job, JobState.QUEUED, "the service is stopping; job requeued")
            return
        if rc == 0 and metrics is not None and job.kind == JobKind.MERGE_EXPORT:
            size = int(metrics.get("size_bytes", 0))
            self._write(job, export_size_bytes=size, metrics=metrics)
            await self._finish(
                job,
                JobState.SUCCEEDED,
                f"{job.tenant}/{job.adapter_name}@{job.adapter_version} merged into "
                f"{job.base_model}: {size} bytes, ready to download",
            )
            return
        if rc == 0 and metrics is not None:
            await self._publish(job, metrics)
            return
        if error is not None:
            kind = ErrorKind.USER if error.kind == USER else ErrorKind.SYSTEM
            message = error.message
        elif rc < 0:
            kind = ErrorKind.SYSTEM
            sig = signal.Signals(-rc).name
            hint = " (likely out of memory)" if -rc == signal.SIGKILL else ""
            message = f"the training process was killed by {sig}{hint}"
        else:
            kind = ErrorKind.USER if rc == EXIT_USER else ErrorKind.SYSTEM
            message = f"the training process exited with code {rc}"
        await self._finish(job, JobState.FAILED, message, kind)

    async def _publish(self, job: JobRecord, metrics: dict[str, Any]) -> None:
        folder = self.layout.attempt(job.id, job.attempt)
        # The loss plot and TensorBoard files ship with the adapter (trainer/service/curves.py).
        title = f"{job.id}  {job.tenant}/{job.adapter_name}"
        root = self.layout.job_dir(job.id)
        await asyncio.to_thread(curves.finish, root, title, folder.output)
        manifest = self.publisher.manifest(
            job_id=job.id,
            tenant=job.tenant,
            adapter=job.adapter_name,
            base_model=job.base_model,
            dataset_sha256=job.dataset_sha256,
            hyperparameters=job.config,
            metrics=metrics,
        )
        try:
            version = await self.publisher.publish(
                job.tenant,
                job.adapter_name,
                folder.output,
                manifest,
                wait_s=self.publish_wait_s,
                waiting=lambda message: self._event(job, JobState.RUNNING, message),
            )
        except AdapterRejected as e:
            await self._finish(job, JobState.FAILED, f"adapter rejected: {e}", ErrorKind.USER)
            return
        except AdapterStorageDown as e:  # its message names no endpoint
            await self._publish_failed(job, str(e), e)
            return
        except OSError as e:
            await self._publish_failed(job, e.strerror or type(e).__name__, e)
            return
        self._write(job, adapter_version=version, metrics=metrics)
        pinned = self.publisher.adapters.pinned(job.tenant, job.adapter_name)
        await self._finish(
            job,
            JobState.SUCCEEDED,
            f"published {job.tenant}/{job.adapter_name} as {version}"
            + (f" ({pinned} stays served: it is pinned)" if pinned else ""),
        )
        if not self.keep_checkpoints:  # the published version is what is kept
            for attempt in self.layout.attempts(job.id):
                await asyncio.to_thread(shutil.rmtree, attempt.checkpoints, True)
            try:
                await asyncio.to_thread(self.files.forget_job, job.id)
            except Unavailable as e:  # the job is done: what is left is only space
                log.warning("job %s: its kept checkpoints stay in object storage: %s", job.id, e)
        await self.publisher.sweep()

    async def _publish_failed(self, job: JobRecord, reason: str, error: Exception) -> None:
        # The tenant reads ``reason``, never the server's paths or the storage's endpoint:
        # those go to the log.
        log.error("publishing %s/%s failed: %s", job.tenant, job.adapter_name, error)
        current = None
        with contextlib.suppress(Unavailable):  # storage that is still down names nothing
            current = self.publisher.adapters.current(job.tenant, job.adapter_name)
        kept = f"; {current} is still the one served" if current else ""
        await self._finish(
            job, JobState.FAILED, f"publishing failed: {reason}{kept}", ErrorKind.SYSTEM
        )

    # ------------------------------------------------------------ cancel
    async def cancel(self, job: JobRecord) -> None:
        run = self._running.get(job.id)
        if run is not None:
            run.cancelled = True
            self._kill(run)
            if run.task:
                await asyncio.shield(run.task)
            return
        # Queued, or held by another worker: the next attempt number fences that worker
        # off (its heartbeat finds the lease gone and stops the run), in the same write.
        taken = job.attempt + 1
        now = time.time()
        if self.store.update_job_fenced(
            job.id,
            job.attempt,
            state=JobState.CANCELLED,
            attempt=taken,
            finished_at=now,
            pid=None,
            error_message="cancelled",
        ):
            message = "cancelled" + (" before it started" if job.state is JobState.QUEUED else "")
            self.store.append_event(job.id, JobState.CANCELLED, message)
            await self.bus.notify()

    def _kill(self, run: _Running) -> None:
        """SIGTERM the job's process group, SIGKILL it if it lingers (in the background)."""
        task = asyncio.ensure_future(run.run.stop(KILL_GRACE_S))
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    def running_pid(self, job_id: str) -> int | None:
        run = self._running.get(job_id)
        return run.run.pid if run else None


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the volume allows one (no bytes copied), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _kill_group_of(pid: int, job_id: str) -> None:
    """Kill a worker left over from before a restart, if ``pid`` is still that worker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    workers = (b"trainer.training.worker", b"trainer.training.export")
    if any(w in cmdline for w in workers) and job_id.encode() in cmdline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])
