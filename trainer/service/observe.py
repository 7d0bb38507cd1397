"""What the service shows of its jobs as they change: transition logs and training curves.

Every job event is stored through ``Store.append_event`` (``Jobs.create`` writes the
QUEUED one, the scheduler the rest), and the store hands each one to the ``JobObserver``
``server.serve`` gives it (``Store.listen``):

* a state change is logged as one line with ``job_id``, ``tenant`` and ``state``
  (a JSON object a line with ``--log-format json``);
* a progress event is appended to the job's curves (``trainer.service.curves``);
* a job that ends FAILED or CANCELLED gets its loss plot drawn (a SUCCEEDED one gets it
  from the scheduler just before publishing, so that the plot ships with the adapter).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from trainer.layout import Layout
from trainer.service import curves
from trainer.service.store import EventRecord, JobState, Store

log = logging.getLogger("trainer.service.jobs")


class JobObserver:
    """Logs job transitions and records curves, event by event (a ``Store`` listener)."""

    def __init__(
        self,
        store: Store,
        layout: Layout,
        on_end: Callable[[str, JobState], None] | None = None,
    ) -> None:
        self._store = store  # read for the job's tenant and adapter on a transition
        self._layout = layout
        self._on_end = on_end  # the metrics' count of ended jobs
        self._states: dict[str, JobState] = {}
        self._curves: dict[str, curves.JobCurves] = {}

    def __call__(self, ev: EventRecord) -> None:
        job_id, state, progress = ev.job_id, ev.state, ev.progress
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
