"""What the service shows of its jobs as they change: transition logs and training curves.

Every job event goes through the store's ``append_event`` (``Jobs.create`` writes the
QUEUED one, the scheduler the rest), so this wraps the store there, once, in
``server.serve``:

* a state change is logged as one line with ``job_id``, ``tenant`` and ``state``
  (a JSON object a line with ``--log-format json``);
* a progress event is appended to the job's curves (``trainer.curves``);
* a job that ends FAILED or CANCELLED gets its loss plot drawn (a SUCCEEDED one gets it
  from the scheduler just before publishing, so that the plot ships with the adapter).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from trainer import curves
from trainer.layout import Layout
from trainer.store import EventRecord, JobState, Store

log = logging.getLogger("trainer.jobs")


class ObservedStore:
    """A ``Store`` that logs job transitions and records curves as events are appended."""

    def __init__(
        self,
        store: Store,
        layout: Layout,
        on_end: Callable[[str, JobState], None] | None = None,
    ) -> None:
        self._store = store
        self._layout = layout
        self._on_end = on_end  # the metrics' count of ended jobs
        self._states: dict[str, JobState] = {}
        self._curves: dict[str, curves.JobCurves] = {}

    def __getattr__(self, name: str) -> Any:  # everything else is the store's own
        return getattr(self._store, name)

    def append_event(
        self, job_id: str, state: JobState, message: str, progress: dict | None = None
    ) -> EventRecord:
        ev = self._store.append_event(job_id, state, message, progress)
        try:
            self._observe(ev, progress)
        except Exception:  # observing never breaks a job
            log.exception("observing an event of job %s failed", job_id)
        return ev

    def _observe(self, ev: EventRecord, progress: dict | None) -> None:
        job_id, state = ev.job_id, ev.state
        if progress:
            c = self._curves.get(job_id)
            if c is None:
                c = self._curves[job_id] = curves.JobCurves(self._layout.job_dir(job_id))
            c.record(progress, ev.time)
        if self._states.get(job_id) is not state:
            self._states[job_id] = state
            job = self._store.get_job(None, job_id)
            log.info(
                "job %s %s: %s",
                job_id,
                state.value,
                ev.message,
                extra={
                    "event": "job_transition",
                    "job_id": job_id,
                    "tenant": job.tenant if job else None,
                    "state": state.value,
                    "adapter": job.adapter_name if job else None,
                },
            )
        if state.terminal:
            if self._on_end is not None:
                self._on_end(job_id, state)
            self._states.pop(job_id, None)
            if (ended := self._curves.pop(job_id, None)) is not None:
                ended.close()
            if state is not JobState.SUCCEEDED:
                curves.finish(self._layout.job_dir(job_id), title=job_id)
