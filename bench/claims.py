"""Claims per second from one queue, by 1, 2 and 4 worker processes (issue 23's figure).

Each worker is its own process with its own store, claiming (with a lease, as workers on
several hosts will) until the queue is empty; the queue holds ``--jobs`` jobs of
``--tenants`` tenants, so every claim makes the fair choice over all of them. PostgreSQL
is a throwaway server (``tests/postgres.py``) unless ``--dsn`` names one; SQLite, one file
in WAL mode, is there for comparison.

    .venv/bin/python -m bench.claims --workers 1 2 4 --jobs 1000 --tenants 20
"""

from __future__ import annotations

import argparse
import multiprocessing
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from trainer.service.pgstore import PostgresStore
from trainer.service.store import JobRecord, SqliteStore


def _open(where: str) -> SqliteStore | PostgresStore:
    return PostgresStore(where) if where.startswith("postgresql://") else SqliteStore(Path(where))


def _worker(where: str, name: str, start: Any, out: Any) -> None:
    store = _open(where)
    start.wait()
    n, last = 0, time.monotonic()
    while True:
        job = (
            store.claim_next(worker=name, lease_s=60.0)
            if isinstance(store, PostgresStore)
            else store.claim_next()
        )
        if job is None:
            break
        n, last = n + 1, time.monotonic()
    out.put((n, last))
    store.close()


def run(where: str, workers: int, jobs: int, tenants: int) -> float:
    """Claims per second of ``workers`` processes emptying a queue of ``jobs`` jobs."""
    store = _open(where)
    for n in range(jobs):
        tenant = f"t{n % tenants}"
        store.add_job(
            JobRecord(f"job-{n}", tenant, "tiny", "ds", "0" * 64, f"a{n}", {}, created_at=n)
        )
    store.close()
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(where, f"w{i}", start, out)) for i in range(workers)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # every worker connected and waiting
    began = time.monotonic()
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    claimed = sum(n for n, _ in results)
    assert claimed == jobs, (claimed, jobs)
    return claimed / (max(last for _, last in results) - began)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--tenants", type=int, default=20)
    ap.add_argument("--engine", choices=["postgres", "sqlite", "both"], default="both")
    ap.add_argument("--dsn", help="a PostgreSQL server's URL (a database is created on it)")
    args = ap.parse_args()

    server = None
    if args.engine != "sqlite" and not args.dsn:
        from tests.postgres import PostgresServer, find_bindir

        bindir = find_bindir()
        if bindir is None:
            raise SystemExit("no PostgreSQL binaries: apt-get install postgresql, or --dsn")
        server = PostgresServer(bindir)
        server.start()
    try:
        for workers in args.workers:
            if args.engine != "sqlite":
                name = f"claims_{secrets.token_hex(4)}"
                if server is not None:
                    where = server.create_database(name)
                else:
                    import psycopg

                    with psycopg.connect(args.dsn, autocommit=True) as conn:
                        conn.execute(f'CREATE DATABASE "{name}"')
                    where = args.dsn.rsplit("/", 1)[0] + f"/{name}"
                rate = run(where, workers, args.jobs, args.tenants)
                print(f"postgres {workers} workers: {rate:7.0f} claims/s", flush=True)
            if args.engine != "postgres":
                with tempfile.TemporaryDirectory() as tmp:
                    rate = run(str(Path(tmp) / "jobs.db"), workers, args.jobs, args.tenants)
                print(f"sqlite   {workers} workers: {rate:7.0f} claims/s", flush=True)
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
