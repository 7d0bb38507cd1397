"""The scheduler: one training subprocess per device, FIFO within a tenant, fair across tenants.

Each job runs as ``python -m trainer.worker spec.json`` in its own process
group (session), so a crash, an out-of-memory kill or a cancel ends the job and
frees its memory without touching the service. The worker's JSON-line events
become the job's events in the store, which ``WatchJob`` replays and follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer import curves
from trainer.config import JobConfig, JobSpec
from trainer.layout import Layout, write_atomic
from trainer.publish import AdapterRejected, Publisher
from trainer.report import Report
from trainer.store import ErrorKind, EventRecord, JobRecord, JobState, Store

log = logging.getLogger(__name__)

USER_ERROR_EXIT = 2
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
    job_id: str
    slot: int
    process: asyncio.subprocess.Process
    cancelled: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def latest_checkpoint(job_dir: Path) -> Path | None:
    ckpts = [p for p in (job_dir / "checkpoints").glob("checkpoint-*") if p.is_dir()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)


def job_spec(store: Store, layout: Layout, job: JobRecord, base_path: str) -> JobSpec:
    """What a training subprocess (or a validation run) needs to know about ``job``."""
    job_dir = layout.job_dir(job.id)
    ds = store.get_dataset(job.tenant, job.dataset_id)
    return JobSpec(
        job_id=job.id,
        base_model=job.base_model,
        base_model_path=base_path,
        dataset_path=str(layout.dataset_file(job.dataset_sha256)),
        output_dir=str(job_dir / "output"),
        checkpoint_dir=str(job_dir / "checkpoints"),
        config=JobConfig.from_dict(job.config),
        dataset_format=ds.format if ds else "",
        dataset_examples=ds.num_rows if ds else 0,
        eval_dataset_path=(
            str(layout.dataset_file(job.validation_sha256)) if job.validation_sha256 else ""
        ),
        eval_fraction=job.eval_fraction,
    )


class Scheduler:
    """Runs queued jobs on the available devices."""

    def __init__(
        self,
        store: Store,
        layout: Layout,
        publisher: Publisher,
        base_models: dict[str, str],
        bus: EventBus,
        devices: int | None = None,
    ) -> None:
        self.store = store
        self.layout = layout
        self.publisher = publisher
        self.base_models = base_models
        self.bus = bus
        self.gpus = count_devices()
        self.slots = devices or max(self.gpus, 1)
        self._running: dict[str, _Running] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._reapers: set[asyncio.Task[None]] = set()
        self._stopping = False

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._recover()
        self._loop_task = asyncio.create_task(self._loop(), name="scheduler")

    async def stop(self) -> None:
        """Stop for a restart: running jobs go back to the queue and resume later."""
        self._stopping = True
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for run in list(self._running.values()):
            self._kill(run)
        for run in list(self._running.values()):
            if run.task:
                with contextlib.suppress(asyncio.CancelledError):
                    await run.task

    def wake(self) -> None:
        self._wake.set()

    async def _event(
        self, job_id: str, state: JobState, message: str, progress: dict | None = None
    ) -> EventRecord:
        ev = self.store.append_event(job_id, state, message, progress)
        await self.bus.notify()
        return ev

    async def _finish(
        self, job_id: str, state: JobState, message: str, kind: ErrorKind = ErrorKind.NONE
    ) -> None:
        fields: dict[str, Any] = {"state": state, "finished_at": time.time(), "pid": None}
        log.info("job %s %s: %s", job_id, state.value, message)
        message = self._redact(message)
        if state is not JobState.SUCCEEDED:
            fields.update(error_kind=kind, error_message=message)
        self.store.update_job(job_id, **fields)
        await self._event(job_id, state, message)

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
        """After a restart: a job that was running resumes from its checkpoint or fails."""
        for job in self.store.jobs_in_states(JobState.VALIDATING, JobState.RUNNING):
            if job.pid:
                _kill_group_of(job.pid, job.id)
            ckpt = latest_checkpoint(self.layout.job_dir(job.id))
            if job.pid is None and ckpt is None:  # claimed, but its worker never started
                self.store.update_job(job.id, state=JobState.QUEUED)
                await self._event(job.id, JobState.QUEUED, "the service restarted; queued again")
            elif ckpt is not None:
                self.store.update_job(job.id, state=JobState.QUEUED, pid=None)
                await self._event(
                    job.id,
                    JobState.QUEUED,
                    f"the service restarted; the job will resume from {ckpt.name}",
                )
            else:
                await self._finish(
                    job.id,
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
            while len(self._running) < self.slots and (job := self.store.claim_next()):
                busy = {r.slot for r in self._running.values()}
                slot = next(s for s in range(self.slots) if s not in busy)
                try:
                    await self._launch(job, slot)
                except Exception as e:  # a broken job must not stop the queue
                    log.exception("could not start job %s", job.id)
                    await self._finish(
                        job.id, JobState.FAILED, f"could not start: {e}", ErrorKind.SYSTEM
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=5.0)

    # ------------------------------------------------------------ running a job
    async def _launch(self, job: JobRecord, slot: int) -> None:
        job_dir = self.layout.job_dir(job.id)
        job_dir.mkdir(parents=True, exist_ok=True)
        base_path = self.base_models.get(job.base_model)
        if base_path is None:
            await self._finish(
                job.id,
                JobState.FAILED,
                f"base model {job.base_model!r} is no longer served",
                ErrorKind.USER,
            )
            return
        spec = job_spec(self.store, self.layout, job, base_path)
        spec_file = job_dir / "spec.json"
        write_atomic(spec_file, json.dumps(spec.to_dict(), indent=2).encode())
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(job_dir / "worker.log", "ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "trainer.worker",
                str(spec_file),
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                env=env,
                start_new_session=True,  # its own process group: killed as a whole
                limit=1 << 20,
            )
        run = _Running(job.id, slot, proc)
        self._running[job.id] = run
        self.store.update_job(job.id, pid=proc.pid)
        device = f"cuda:{slot}" if self.gpus else "cpu"
        log.info("job %s of %s started on %s (pid %d)", job.id, job.tenant, device, proc.pid)
        await self._event(job.id, JobState.VALIDATING, f"started on {device}")
        run.task = asyncio.create_task(self._supervise(job, run), name=f"job-{job.id}")

    async def _supervise(self, job: JobRecord, run: _Running) -> None:
        state = JobState.VALIDATING
        error: dict[str, Any] | None = None
        metrics: dict[str, Any] | None = None
        latest: dict[str, Any] = dict(job.progress or {})
        try:
            assert run.process.stdout is not None
            async for raw in run.process.stdout:
                try:
                    ev = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                kind = ev.get("event")
                if kind == "state":
                    state = JobState(ev["state"])
                    self.store.update_job(job.id, state=state)
                    await self._event(job.id, state, ev.get("message", state.value.lower()))
                elif kind == "progress":
                    progress = {k: v for k, v in ev.items() if k != "event"}
                    # An evaluation reports eval_loss alone: the job keeps the latest of each.
                    latest = {**latest, **{k: v for k, v in progress.items() if v is not None}}
                    self.store.update_job(job.id, progress=latest)
                    await self._event(job.id, state, "progress", progress)
                elif kind == "report":
                    self.store.update_job(job.id, report=ev["report"])
                    await self._event(job.id, state, Report.from_dict(ev["report"]).summary())
                elif kind == "checkpoint":
                    await self._event(job.id, state, f"checkpoint saved at step {ev.get('step')}")
                elif kind == "done":
                    metrics = ev.get("metrics", {})
                elif kind == "error":
                    error = ev
            rc = await run.process.wait()
            await self._conclude(job, run, rc, metrics, error)
        except asyncio.CancelledError:
            self._kill(run)
            raise
        except Exception as e:
            log.exception("supervising job %s failed", job.id)
            await self._finish(job.id, JobState.FAILED, f"internal error: {e}", ErrorKind.SYSTEM)
        finally:
            self._running.pop(job.id, None)
            self.wake()

    async def _conclude(
        self,
        job: JobRecord,
        run: _Running,
        rc: int,
        metrics: dict[str, Any] | None,
        error: dict[str, Any] | None,
    ) -> None:
        if run.cancelled:
            await self._finish(job.id, JobState.CANCELLED, "cancelled")
            return
        if self._stopping:
            # The service is shutting down: back to the queue, resumed on the next start.
            self.store.update_job(job.id, state=JobState.QUEUED, pid=None)
            await self._event(job.id, JobState.QUEUED, "the service is stopping; job requeued")
            return
        if rc == 0 and metrics is not None:
            await self._publish(job, metrics)
            return
        if error is not None:
            kind = ErrorKind.USER if error.get("kind") == "user" else ErrorKind.SYSTEM
            message = error.get("message", "")
        elif rc < 0:
            kind = ErrorKind.SYSTEM
            sig = signal.Signals(-rc).name
            hint = " (likely out of memory)" if -rc == signal.SIGKILL else ""
            message = f"the training process was killed by {sig}{hint}"
        else:
            kind = ErrorKind.USER if rc == USER_ERROR_EXIT else ErrorKind.SYSTEM
            message = f"the training process exited with code {rc}"
        await self._finish(job.id, JobState.FAILED, message, kind)

    async def _publish(self, job: JobRecord, metrics: dict[str, Any]) -> None:
        job_dir = self.layout.job_dir(job.id)
        # The loss plot and TensorBoard files ship with the adapter (trainer/curves.py).
        title = f"{job.id}  {job.tenant}/{job.adapter_name}"
        await asyncio.to_thread(curves.finish, job_dir, title, job_dir / "output")
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
                job.tenant, job.adapter_name, job_dir / "output", manifest
            )
        except AdapterRejected as e:
            await self._finish(job.id, JobState.FAILED, f"adapter rejected: {e}", ErrorKind.USER)
            return
        except OSError as e:
            # The tenant reads this: the reason, not the server's paths (those go to the log).
            log.error("publishing %s/%s failed: %s", job.tenant, job.adapter_name, e)
            reason = e.strerror or type(e).__name__
            current = self.layout.current_version(job.tenant, job.adapter_name)
            kept = f"; {current} is still the one served" if current else ""
            await self._finish(
                job.id, JobState.FAILED, f"publishing failed: {reason}{kept}", ErrorKind.SYSTEM
            )
            return
        self.store.update_job(job.id, adapter_version=version, metrics=metrics)
        await self._finish(
            job.id,
            JobState.SUCCEEDED,
            f"published {job.tenant}/{job.adapter_name} as {version}",
        )

    # ------------------------------------------------------------ cancel
    async def cancel(self, job: JobRecord) -> None:
        run = self._running.get(job.id)
        if run is not None:
            run.cancelled = True
            self._kill(run)
            if run.task:
                await asyncio.shield(run.task)
        elif job.state is JobState.QUEUED:
            await self._finish(job.id, JobState.CANCELLED, "cancelled before it started")

    def _kill(self, run: _Running) -> None:
        """SIGTERM the job's process group, SIGKILL it if it lingers."""
        pid = run.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)

        async def _reap() -> None:
            try:
                await asyncio.wait_for(run.process.wait(), KILL_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            # children that outlived the leader
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

        task = asyncio.ensure_future(_reap())
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    def running_pid(self, job_id: str) -> int | None:
        run = self._running.get(job_id)
        return run.process.pid if run else None


def _kill_group_of(pid: int, job_id: str) -> None:
    """Kill a worker left over from before a restart, if ``pid`` is still that worker."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"trainer.worker" in cmdline and job_id.encode() in cmdline:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
