"""What only the PostgreSQL store promises, on a real server and from real processes:
workers racing over one queue claim each job once and keep tenants fair; an expired lease
moves a job to another worker, and the first one's writes are fenced off; the store rides
over a server restart. Plus: it answers every call as SqliteStore does."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from trainer.errors import AlreadyExists
from trainer.service.pgstore import PostgresStore, StoreUnavailable
from trainer.service.store import (
    AdapterRecord,
    DatasetRecord,
    JobKind,
    JobRecord,
    JobState,
    SqliteStore,
)

pytest_plugins = ("tests.postgres",)


def _add(store: Any, tenant: str, n: int, created: float, name: str = "") -> str:
    job_id = f"job-{tenant}-{n}"
    store.add_job(
        JobRecord(job_id, tenant, "tiny", "ds-1", "0" * 64, name or f"a{n}", {}, created_at=created)
    )
    return job_id


def _claim_all(dsn: str, worker: str, start: Any, out: Any) -> None:
    store = PostgresStore(dsn)
    start.wait()  # every worker connected: on a busy machine a late one would miss the race
    claims = []
    while (job := store.claim_next(worker=worker, lease_s=60.0)) is not None:
        claims.append((job.id, job.tenant, job.started_at, job.attempt, job.worker))
        time.sleep(0.03)  # starting the job
    out.put(claims)
    store.close()


@pytest.mark.parametrize("workers", [2, 4])
def test_workers_racing_claim_each_job_once_and_tenants_take_turns(
    postgres_dsn: str, workers: int
) -> None:
    store = PostgresStore(postgres_dsn)
    tenants = [f"t{k}" for k in range(5)]
    # Each tenant's 10 jobs queued in one block: FIFO alone would serve t0 ten times first.
    queued = {
        _add(store, t, n, float(k * 10 + n)) for k, t in enumerate(tenants) for n in range(10)
    }
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_claim_all, args=(postgres_dsn, f"w{i}", start, out))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    claims = [c for _ in procs for c in out.get(timeout=120)]
    for p in procs:
        p.join(60)

    assert sorted(c[0] for c in claims) == sorted(queued)  # each once, none twice
    assert {c[3] for c in claims} == {1}  # first attempts all
    assert len({c[4] for c in claims}) > 1, "one worker took every job: no race was run"
    # In claim order (the database's clock), FIFO within a tenant, and the tenants take
    # turns: at no point is one more than a claim ahead of another (FIFO alone would put
    # t0 ten ahead), give or take one claim in flight.
    claims.sort(key=lambda c: (c[2], c[0]))
    for t in tenants:
        assert [c[0] for c in claims if c[1] == t] == [f"job-{t}-{n}" for n in range(10)]
    counts: Counter[str] = Counter({t: 0 for t in tenants})
    worst = 0
    for c in claims:
        counts[c[1]] += 1
        worst = max(worst, max(counts.values()) - min(counts.values()))
    assert worst <= 2, [c[1] for c in claims]
    assert store.claim_next() is None
    store.close()


def _hold_until_lost(dsn: str, out: Any) -> None:
    """A worker: claims with a 2 s lease, runs the job, renews every 0.2 s while it may."""
    store = PostgresStore(dsn)
    job = store.claim_next(worker="w1", lease_s=2.0)
    assert job is not None
    running = store.update_job_fenced(job.id, job.attempt, state=JobState.RUNNING)
    out.put((job.id, job.attempt, job.started_at, running))
    while store.renew_lease(job.id, job.attempt, 2.0):
        time.sleep(0.2)
    # Stopped past its lease, woken after another worker took the job: fenced off.
    out.put(store.update_job_fenced(job.id, job.attempt, state=JobState.FAILED, progress={"w": 1}))
    store.close()


def test_an_expired_lease_moves_the_job_and_fences_the_first_worker(postgres_dsn: str) -> None:
    store = PostgresStore(postgres_dsn)
    job_id = _add(store, "acme", 1, 1.0)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    first = ctx.Process(target=_hold_until_lost, args=(postgres_dsn, out))
    first.start()
    try:
        claimed_id, attempt, started_at, running = out.get(timeout=60)
        assert (claimed_id, attempt, running) == (job_id, 1, True)
        time.sleep(3.0)  # past the lease: its heartbeats keep it
        assert store.claim_next(worker="w2", lease_s=30.0) is None

        os.kill(first.pid or 0, signal.SIGSTOP)  # paused, as by a GC pause or a partition
        time.sleep(3.0)
        second = store.claim_next(worker="w2", lease_s=30.0)
        assert second is not None and second.id == job_id
        assert (second.attempt, second.worker, second.state) == (2, "w2", JobState.VALIDATING)
        assert second.started_at == started_at  # the first start stays the job's start
        assert store.update_job_fenced(job_id, 2, state=JobState.RUNNING, progress={"w": 2})
        os.kill(first.pid or 0, signal.SIGCONT)

        assert out.get(timeout=60) is False  # the first worker's write was refused
        first.join(60)
        job = store.get_job("acme", job_id)
        assert job is not None and (job.state, job.progress) == (JobState.RUNNING, {"w": 2})
        assert not store.renew_lease(job_id, 1, 30.0)
        assert store.renew_lease(job_id, 2, 30.0)
        store.update_job(job_id, state=JobState.SUCCEEDED)
        assert not store.renew_lease(job_id, 2, 30.0)  # an ended job has no lease to renew
    finally:
        if first.is_alive():
            os.kill(first.pid or 0, signal.SIGCONT)
            first.kill()
        store.close()


def test_concurrent_callers_on_separate_connections(postgres_dsn: str) -> None:
    """Threads, each call on its own pooled connection: one of four case-variants of a
    name is added; 200 events appended at once are numbered 1..200."""
    stores = [PostgresStore(postgres_dsn) for _ in range(4)]

    def add(n: int) -> bool:
        name = ["secret", "Secret", "SECRET", "sEcReT"][n % 4]
        try:
            _add(stores[n % 4], "acme", n, float(n), name)
        except AlreadyExists:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(add, range(8))) == 1
        list(
            pool.map(lambda n: stores[n % 4].append_event("j", JobState.QUEUED, f"{n}"), range(200))
        )
    events = stores[0].events_after("j", 0)
    assert [e.seq for e in events] == list(range(1, 201))
    assert sorted(int(e.message) for e in events) == list(range(200))
    for s in stores:
        s.close()


def test_a_restart_is_survived_and_an_outage_is_a_clear_error() -> None:
    from tests.postgres import running_server  # (imported here: pytest_plugins loads it first)

    with running_server() as server:
        dsn = server.create_database("jobs")
        store = PostgresStore(dsn, timeout=2.0)
        job_id = _add(store, "acme", 1, 1.0)

        server.restart()  # the pool's connection dies with the old server
        assert store.get_job("acme", job_id) is not None

        server.stop()
        began = time.monotonic()
        unavailable = rf"PostgreSQL at 127\.0\.0\.1:{server.port}/jobs\) is unavailable: .*refused"
        with pytest.raises(StoreUnavailable, match=unavailable):
            store.claim_next()
        assert time.monotonic() - began < 6.0  # the timeout, not a hang
        with pytest.raises(StoreUnavailable, match=unavailable):
            PostgresStore(dsn, timeout=1.0)

        server.start()  # same port, same data: the same store object carries on
        job = store.claim_next()
        assert job is not None and job.id == job_id
        store.close()


def _normal(value: Any) -> Any:
    """A store's answer, comparable across engines: records as dicts, without what each
    stamps with its own clock (a claim's start, an event's time) or keeps only here."""
    if isinstance(value, list):
        return [_normal(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        d = dataclasses.asdict(value)
        for k in ("time", "attempt", "worker", "lease_until"):
            d.pop(k, None)
        if d.get("started_at", 0) and d["started_at"] > 1e9:
            d["started_at"] = "now"
        return d
    return value


def _script(store: Any) -> list[Any]:
    """The calls the service makes, with the answers each gave (an error's type and text)."""
    ds = DatasetRecord("ds-1", "acme", "Chat", "a" * 64, 10, 2, "messages", 1.0, request_id="r1")
    calls: list[tuple[str, Any]] = [
        ("add_dataset", lambda: store.add_dataset(ds)),
        ("again", lambda: store.add_dataset(dataclasses.replace(ds, id="ds-2"))),
        ("name", lambda: store.add_dataset(dataclasses.replace(ds, id="ds-3", request_id=""))),
        ("case", lambda: store.add_dataset(dataclasses.replace(ds, id="ds-4", name="CHAT"))),
        (
            "other",
            lambda: store.add_dataset(
                DatasetRecord("ds-5", "acme", "b", "b" * 64, 1, 1, "text", 2.0)
            ),
        ),
        ("get", lambda: store.get_dataset("acme", "ds-1")),
        ("get other tenant", lambda: store.get_dataset("bolt", "ds-1")),
        ("by name", lambda: store.find_dataset_by_name("acme", "chat")),
        ("by request", lambda: store.find_dataset_by_request("acme", "r1")),
        ("list", lambda: store.list_datasets("acme")),
        ("in use", lambda: store.sha256_in_use("a" * 64)),
        ("delete", lambda: store.delete_dataset("acme", "ds-5")),
        ("delete again", lambda: store.delete_dataset("acme", "ds-5")),
        (
            "job",
            lambda: store.add_job(
                JobRecord(
                    "job-1",
                    "acme",
                    "tiny",
                    "ds-1",
                    "a" * 64,
                    "x",
                    {"lr": 2e-4, "n": [1, 2]},
                    created_at=5.0,
                    request_id="q1",
                )
            ),
        ),
        (
            "job again",
            lambda: store.add_job(
                JobRecord("job-2", "acme", "tiny", "ds-1", "a" * 64, "x", {}, request_id="q1")
            ),
        ),
        (
            "busy name",
            lambda: store.add_job(JobRecord("job-3", "acme", "tiny", "ds-1", "a" * 64, "X", {})),
        ),
        (
            "export",
            lambda: store.add_job(
                JobRecord(
                    "job-4",
                    "acme",
                    "tiny",
                    "",
                    "",
                    "x",
                    {},
                    kind=JobKind.MERGE_EXPORT,
                    adapter_version="v0001",
                    created_at=6.0,
                )
            ),
        ),
        ("by job request", lambda: store.find_job_by_request("acme", "q1")),
        ("claim", lambda: store.claim_next()),
        (
            "update",
            lambda: store.update_job(
                "job-1", state=JobState.RUNNING, progress={"step": 3, "loss": 1.5}, pid=4242
            ),
        ),
        ("get job", lambda: store.get_job("acme", "job-1")),
        ("get job, other tenant", lambda: store.get_job("bolt", "job-1")),
        ("get job, any tenant", lambda: store.get_job(None, "job-1")),
        ("list jobs", lambda: store.list_jobs("acme")),
        ("list running", lambda: store.list_jobs("acme", (JobState.RUNNING,))),
        ("list x", lambda: store.list_jobs("acme", adapter_name="x")),
        ("in states", lambda: store.jobs_in_states(JobState.QUEUED, JobState.RUNNING)),
        ("in no state", lambda: store.jobs_in_states()),
        ("event", lambda: store.append_event("job-1", JobState.RUNNING, "step", {"step": 3})),
        ("event 2", lambda: store.append_event("job-1", JobState.RUNNING, "done")),
        ("events", lambda: store.events_after("job-1", 0)),
        ("events after 1", lambda: store.events_after("job-1", 1)),
        (
            "adapter",
            lambda: store.add_adapter(AdapterRecord("acme", "x", "v0001", "job-1", "tiny", 7.0)),
        ),
        (
            "adapter 2",
            lambda: store.add_adapter(AdapterRecord("acme", "x", "v0002", "job-1", "tiny", 8.0)),
        ),
        (
            "adapter B",
            lambda: store.add_adapter(AdapterRecord("acme", "B", "v0001", "job-1", "tiny", 9.0)),
        ),
        (
            "replace",
            lambda: store.add_adapter(AdapterRecord("acme", "B", "v0001", "job-9", "tiny", 9.5)),
        ),
        ("adapters", lambda: store.list_adapters("acme")),
        ("versions", lambda: store.list_adapter_versions("acme", "x")),
        ("delete version", lambda: store.delete_adapter_version("acme", "x", "v0002")),
        ("adapters after", lambda: store.list_adapters("acme")),
        ("delete adapter", lambda: store.delete_adapter("acme", "B")),
        ("delete adapter again", lambda: store.delete_adapter("acme", "B")),
        ("other tenant's", lambda: store.list_adapters("bolt")),
    ]
    answers = []
    for what, call in calls:
        try:
            answers.append((what, _normal(call())))
        except Exception as e:
            answers.append((what, type(e).__name__, str(e)))
    return answers


def test_both_stores_answer_alike(postgres_dsn: str, tmp_path: Path) -> None:
    sqlite = SqliteStore(tmp_path / "jobs.db")
    postgres = PostgresStore(postgres_dsn)
    expected = _script(sqlite)
    assert any(len(a) == 3 and a[1] == "AlreadyExists" for a in expected)  # errors compared too
    assert _script(postgres) == expected
    sqlite.close()
    postgres.close()
