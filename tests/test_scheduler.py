"""The scheduler's queue on a real store: fair across tenants by their latest start, ended
jobs included, while choosing the next job reads queued jobs only."""

from __future__ import annotations

from typing import Any

from trainer.layout import Layout
from trainer.publish import Publisher
from trainer.scheduler import EventBus, Scheduler
from trainer.store import JobRecord, JobState, SqliteStore


class CountingStore:
    """The store, noting which states each ``jobs_in_states`` call asked for."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self.asked: list[tuple[JobState, ...]] = []

    def jobs_in_states(self, *states: JobState) -> list[JobRecord]:
        self.asked.append(states)
        return self._store.jobs_in_states(*states)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def _job(store: SqliteStore, tenant: str, n: int, created: float, **fields: Any) -> str:
    job_id = f"job-{tenant}-{n}"
    rec = JobRecord(job_id, tenant, "tiny", "ds-1", "0" * 64, f"a{n}", {}, created_at=created)
    store.add_job(rec)
    if fields:
        store.update_job(job_id, **fields)
    return job_id


def test_next_job_is_the_least_recently_served_tenants_oldest(tmp_path):
    layout = Layout(tmp_path / "data").create()
    sqlite = SqliteStore(layout.db)
    ended = {"state": JobState.SUCCEEDED}
    # acme last started a job at 200 and bolt at 100 (both jobs ended since); cato never;
    # dana's queued job ran before a restart (started at 300) and waits to resume.
    _job(sqlite, "acme", 0, 0.0, started_at=200.0, **ended)
    _job(sqlite, "bolt", 0, 0.0, started_at=100.0, state=JobState.CANCELLED)
    acme = _job(sqlite, "acme", 1, 1.0)
    acme2 = _job(sqlite, "acme", 2, 1.5)
    bolt = _job(sqlite, "bolt", 1, 2.0)
    cato = _job(sqlite, "cato", 1, 3.0)
    dana = _job(sqlite, "dana", 1, 0.5, started_at=300.0)
    store = CountingStore(sqlite)
    sched = Scheduler(store, layout, Publisher(layout, store, 64), {}, EventBus())  # type: ignore[arg-type]

    order = []
    while (job := sched._next_job()) is not None and len(order) < 5:
        order.append(job.id)
        sqlite.update_job(job.id, state=JobState.CANCELLED)  # out of the queue, not started
    # Never served first, then by latest start, an ended job's start counted (acme's 200
    # waits behind bolt's 100 though acme's job is older); within a tenant, oldest first.
    assert order == [cato, bolt, acme, acme2, dana]
    assert store.asked and all(states == (JobState.QUEUED,) for states in store.asked)
    sqlite.close()
