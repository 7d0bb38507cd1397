"""The job store keeps what must hold across processes, each in one transaction: the
next job is claimed fairly and once, and an adapter name has one active job. Every test
runs on both stores, the real SQLite file and a real PostgreSQL database (``where`` names
either), from several processes at once where it says so."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from trainer.errors import AlreadyExists, StorageFull
from trainer.service.pgstore import PostgresStore
from trainer.service.store import AdapterRecord, JobRecord, JobState, SqliteStore, Store

pytest_plugins = ("tests.postgres",)


def open_store(where: str) -> SqliteStore | PostgresStore:
    """The store at ``where``: a PostgreSQL URL, or an SQLite file's path."""
    if where.startswith("postgresql://"):
        return PostgresStore(where)
    return SqliteStore(Path(where))


@pytest.fixture(params=["sqlite", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store's location, for each engine."""
    if request.param == "sqlite":
        return str(tmp_path / "jobs.db")
    return str(request.getfixturevalue("postgres_dsn"))


def _job(store: Store, tenant: str, n: int, created: float, **fields: Any) -> str:
    job_id = f"job-{tenant}-{n}"
    store.add_job(
        JobRecord(job_id, tenant, "tiny", "ds-1", "0" * 64, f"a{n}", {}, created_at=created)
    )
    if fields:
        store.update_job(job_id, **fields)
    return job_id


def test_claims_are_fair_across_tenants_and_fifo_within_one(where: str) -> None:
    store = open_store(where)
    ended = {"state": JobState.SUCCEEDED}
    # acme last started a job at 200 and bolt at 100 (both jobs ended since); cato never;
    # dana's queued job ran before a restart (started at 300) and waits to resume.
    _job(store, "acme", 0, 0.0, started_at=200.0, **ended)
    _job(store, "bolt", 0, 0.0, started_at=100.0, state=JobState.CANCELLED)
    acme = _job(store, "acme", 1, 1.0)
    acme2 = _job(store, "acme", 2, 1.5)
    bolt = _job(store, "bolt", 1, 2.0)
    cato = _job(store, "cato", 1, 3.0)
    dana = _job(store, "dana", 1, 0.5, started_at=300.0)

    claimed = []
    while (job := store.claim_next()) is not None:
        assert job.state is JobState.VALIDATING
        assert store.get_job(None, job.id).state is JobState.VALIDATING  # off the queue
        claimed.append(job)
    # Never served first, then by latest start, an ended job's start counted (acme's 200
    # waits behind bolt's 100 though acme's job is older). Each claim starts a job: acme's
    # second waits behind dana (300), whose resumed job keeps its first start.
    assert [j.id for j in claimed] == [cato, bolt, acme, dana, acme2]
    assert next(j for j in claimed if j.id == dana).started_at == 300.0
    assert all(j.started_at and j.started_at > 300.0 for j in claimed if j.id != dana)
    store.close()


def test_an_adapter_name_has_one_active_job_and_one_case(where: str) -> None:
    store = open_store(where)

    def add(job_id: str, name: str) -> None:
        store.add_job(JobRecord(job_id, "acme", "tiny", "ds-1", "0" * 64, name, {}))

    add("job-1", "secret")
    with pytest.raises(AlreadyExists, match="job job-1 for adapter 'secret' is QUEUED"):
        add("job-2", "SECRET")
    add("job-3", "other")  # another name, or another tenant's same name, is fine
    store.add_job(JobRecord("job-4", "bolt", "tiny", "ds-1", "0" * 64, "secret", {}))
    store.update_job("job-1", state=JobState.SUCCEEDED)
    store.add_adapter(AdapterRecord("acme", "secret", "v0001", "job-1", "tiny", 0.0))
    add("job-5", "secret")  # retraining an ended job's name
    store.update_job("job-5", state=JobState.FAILED)
    with pytest.raises(AlreadyExists, match="adapter 'secret' exists"):
        add("job-6", "Secret")  # would share a folder on a case-insensitive volume
    assert {j.id for j in store.list_jobs("acme")} == {"job-1", "job-3", "job-5"}
    store.close()


def _race_add(db: str, n: int, start: Any, out: Any) -> None:
    store = open_store(db)
    start.wait()
    try:
        store.add_job(JobRecord(f"job-{n}", "acme", "tiny", "ds-1", "0" * 64, "secret", {}))
        out.put(n)
    except AlreadyExists:
        out.put(None)


def _race_claim(db: str, start: Any, out: Any) -> None:
    store = open_store(db)
    start.wait()
    while (job := store.claim_next()) is not None:
        out.put(job.id)
    out.put("done")


def test_processes_racing_on_one_file_add_once_and_claim_once(where: str) -> None:
    """What an in-process lock could not give: the store's own transactions hold across
    processes (several services on one volume, or workers on one database)."""
    db = where
    open_store(db).close()
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race_add, args=(str(db), n, start, out)) for n in range(6)]
    for p in procs:
        p.start()
    start.set()
    added = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
    assert len([n for n in added if n is not None]) == 1, added

    store = open_store(db)
    store.update_job(f"job-{next(n for n in added if n is not None)}", state=JobState.CANCELLED)
    queued = {_job(store, f"t{n % 5}", n, float(n)) for n in range(40)}
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race_claim, args=(str(db), start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    claimed, done = [], 0
    while done < len(procs):
        item = out.get(timeout=60)
        done += item == "done"
        if item != "done":
            claimed.append(item)
    for p in procs:
        p.join(60)
    assert sorted(claimed) == sorted(queued)  # each claimed, none twice
    store.close()


def _fill_the_disk(where: str, store: Store) -> None:
    """Make the engine answer "disk full" from now on, with its own error."""
    if isinstance(store, SqliteStore):
        (pages,) = sqlite3.connect(where).execute("PRAGMA page_count").fetchone()
        store._db.execute(f"PRAGMA max_page_count={pages}")  # SQLite's cap: SQLITE_FULL past it
        return
    # PostgreSQL's own disk_full (SQLSTATE 53100), raised by the server where a write
    # would extend a file.
    with psycopg.connect(where, autocommit=True) as db:
        db.execute(
            "CREATE FUNCTION disk_full() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'could not extend file: No space left on device' "
            "USING ERRCODE = 'disk_full'; END $$"
        )
        db.execute(
            "CREATE TRIGGER disk_full BEFORE INSERT ON events "
            "FOR EACH ROW EXECUTE FUNCTION disk_full()"
        )


def test_a_full_disk_is_storage_full(where: str) -> None:
    """The engine's "disk full" becomes the domain's StorageFull (RESOURCE_EXHAUSTED at
    the edge), and what was stored before stays."""
    store = open_store(where)
    _job(store, "acme", 0, 0.0)
    _fill_the_disk(where, store)
    with pytest.raises(StorageFull, match="out of disk space"):
        for _ in range(2000):
            store.append_event("job-acme-0", JobState.QUEUED, "x" * 4000)
    assert store.get_job(None, "job-acme-0") is not None
    store.close()


def test_a_lapsed_lease_is_claimed_again_and_the_old_attempt_is_fenced_off(where: str) -> None:
    """A worker that stops renewing (dead, or paused) loses its job to the next claim;
    every write it makes after that, renewal included, is refused. Both engines."""
    import time

    store = open_store(where)
    job_id = _job(store, "acme", 1, 1.0)
    first = store.claim_next(worker="w1", lease_s=0.5)
    assert first is not None and (first.id, first.attempt, first.worker) == (job_id, 1, "w1")
    assert store.renew_lease(job_id, 1, 0.5)
    assert store.claim_next(worker="w2", lease_s=30.0) is None  # held, not lapsed
    time.sleep(0.7)
    second = store.claim_next(worker="w2", lease_s=30.0)
    assert second is not None and (second.id, second.attempt, second.worker) == (job_id, 2, "w2")
    assert second.started_at == first.started_at  # the job's first start is kept
    # The first attempt writes nothing any more; the second does.
    assert not store.renew_lease(job_id, 1, 30.0)
    assert not store.update_job_fenced(job_id, 1, state=JobState.FAILED)
    assert store.append_event_fenced(job_id, 1, JobState.FAILED, "late") is None
    assert store.update_job_fenced(job_id, 2, state=JobState.RUNNING)
    ev = store.append_event_fenced(job_id, 2, JobState.RUNNING, "resumed")
    assert ev is not None and [e.message for e in store.events_after(job_id, 0)] == ["resumed"]
    # A job claimed without a lease never lapses.
    other = _job(store, "bolt", 1, 2.0)
    assert store.claim_next(worker="w3").id == other  # type: ignore[union-attr]
    time.sleep(0.1)
    assert store.claim_next(worker="w4", lease_s=1.0) is None
    store.close()
