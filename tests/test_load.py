"""Load on the trainer: 50 concurrent uploads and job submissions from ten tenants.

Every submission is accepted or cleanly refused (the malformed ones, by design), none is
lost, and the queue is fair: with one device slot held while they all arrive, the jobs
start round-robin across tenants, whichever tenant submitted most. The queue is drained
by cancelling each job as it starts (no model is trained; what is measured is the queue).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.service import Service, add_tenant, chat_rows
from trainer.processes import wait_for

pytestmark = pytest.mark.slow

TENANTS = [f"t{i}" for i in range(10)]
# t0 is greedy: 14 submissions; the nine others 4 each. 50 in all.
SUBMISSIONS = [("t0", n) for n in range(14)] + [(t, n) for t in TENANTS[1:] for n in range(4)]


def _worker_pids(data: Path) -> dict[str, int]:
    """job id -> pid of each live training subprocess of this data dir."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if b"trainer.training.worker" in cmd and ") Z" not in stat:
            spec = next((c for c in cmd if c.endswith(b"spec.json") and bytes(data) in c), None)
            if spec:
                found[Path(spec.decode()).parent.name] = int(d.name)
    return found


def test_fifty_concurrent_submissions_none_lost_and_fair(tmp_path):
    data = tmp_path / "data"
    keys = {t: add_tenant(data, t) for t in [*TENANTS, "holder"]}
    svc = Service(data, {"tiny": str(data / "no-model")}, extra=["--devices", "1"]).start()
    clients = {t: svc.client(k) for t, k in keys.items()}
    try:
        # One job holds the only slot (its process stopped) while the 50 arrive.
        holder = clients["holder"]
        body = "".join(json.dumps(r) + "\n" for r in chat_rows("q", "a", 12))
        (tmp_path / "h.jsonl").write_text(body)
        hold = holder.create_job("tiny", holder.upload_dataset(tmp_path / "h.jsonl", "h").id, "h")
        held_pid = wait_for(lambda: _worker_pids(data).get(hold.id), 60, every=0.02)
        os.kill(held_pid, signal.SIGSTOP)

        def submit(tenant: str, n: int):
            """Upload, then create a job on it; every 7th upload is malformed on purpose."""
            c = clients[tenant]
            bad = (int(tenant[1:]) + n) % 7 == 0
            path = tmp_path / f"{tenant}-{n}.jsonl"
            path.write_text(body.replace('"a"', f'"answer {n}"') + ("{oops\n" if bad else ""))
            t0 = time.perf_counter()
            try:
                ds = c.upload_dataset(path, f"d{n}")
            except grpc.RpcError as e:
                return ("upload refused", e.code(), tenant, n, time.perf_counter() - t0)
            job = c.create_job("tiny", ds.id, f"a{n}")
            return (
                "accepted",
                (ds, job, hashlib.sha256(path.read_bytes()).hexdigest()),
                tenant,
                n,
                time.perf_counter() - t0,
            )

        barrier = threading.Barrier(len(SUBMISSIONS))

        def go(args):
            barrier.wait(30)
            return submit(*args)

        started = time.perf_counter()
        with ThreadPoolExecutor(len(SUBMISSIONS)) as pool:
            results = list(pool.map(go, SUBMISSIONS))
        wall = time.perf_counter() - started
        latencies = sorted(r[4] for r in results)
        refused = [r for r in results if r[0] != "accepted"]
        accepted = [r for r in results if r[0] == "accepted"]
        print(
            f"\n50 concurrent upload+create: {len(accepted)} accepted, {len(refused)} refused "
            f"(malformed on purpose) in {wall:.2f}s; per submission p50 "
            f"{statistics.median(latencies) * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms"
        )
        assert refused and all(r[1] == grpc.StatusCode.INVALID_ARGUMENT for r in refused)
        expected_refused = {(t, n) for t, n in SUBMISSIONS if (int(t[1:]) + n) % 7 == 0}
        assert {(r[2], r[3]) for r in refused} == expected_refused

        # None lost: every accepted dataset and job is there, byte for byte and queued.
        for tenant in TENANTS:
            mine = [r[1] for r in accepted if r[2] == tenant]
            c = clients[tenant]
            listed = {d.id: d for d in c.list_datasets()}
            assert {ds.id for ds, _, _ in mine} == set(listed)
            for ds, _, sha in mine:
                assert listed[ds.id].sha256 == sha
                assert (data / "datasets" / sha).is_file()
            jobs = {j.id: j for j in c.list_jobs()}
            assert {job.id for _, job, _ in mine} == set(jobs)
            assert all(j.state == pb.JOB_STATE_QUEUED for j in jobs.values())
        owner = {job.id: r[2] for r in accepted for _, job, _ in [r[1]]}

        # Release the slot (the held process is killed, as the OOM killer would), then
        # cancel each job the moment it starts.
        os.kill(held_pid, signal.SIGKILL)
        order: list[str] = []
        while len(order) < len(owner):
            running = wait_for(lambda: _worker_pids(data), 60, every=0.02)
            for job_id in running:
                if job_id in owner and job_id not in order:
                    order.append(job_id)
                    cancelled = clients[owner[job_id]].cancel_job(job_id)
                    assert cancelled.state == pb.JOB_STATE_CANCELLED
        assert holder.get_job(hold.id).state == pb.JOB_STATE_FAILED

        # Round-robin: whenever a tenant starts its (k+1)-th job, every tenant that still
        # had a job waiting has already started k.
        totals = {t: sum(1 for o in owner.values() if o == t) for t in TENANTS}
        counts = dict.fromkeys(TENANTS, 0)
        for job_id in order:
            t = owner[job_id]
            waiting = [u for u in TENANTS if counts[u] < totals[u]]
            assert all(counts[u] >= counts[t] for u in waiting), (t, counts)
            counts[t] += 1
        first = [owner[j] for j in order[: len(TENANTS)]]
        assert sorted(first) == sorted(TENANTS)  # one job of each tenant before any second
        # Start times agree with what the service recorded.
        recorded = sorted(
            (clients[owner[j]].get_job(j).started_at.ToNanoseconds(), j) for j in order
        )
        assert [j for _, j in recorded] == order
        assert not _worker_pids(data)
    finally:
        for c in clients.values():
            c.close()
        assert svc.stop() == 0, svc.log()[-3000:]


def test_racing_for_one_name_exactly_one_wins_and_the_losers_store_nothing(tmp_path):
    """20 concurrent uploads under one name (different bytes), then 20 concurrent jobs for
    one adapter name: one of each is accepted, the others ALREADY_EXISTS, and no file of
    a loser stays on the volume."""
    data = tmp_path / "data"
    key = add_tenant(data, "acme")
    svc = Service(data, {"tiny": str(data / "no-model")}).start()
    n = 20
    try:
        with svc.client(key) as c:
            paths = []
            for i in range(n):
                rows = chat_rows("q", f"answer {i}", 12)
                p = tmp_path / f"same-{i}.jsonl"
                p.write_text("".join(json.dumps(r) + "\n" for r in rows))
                paths.append(p)
            barrier = threading.Barrier(n)

            def upload(p: Path):
                barrier.wait(30)
                try:
                    return c.upload_dataset(p, "same")
                except grpc.RpcError as e:
                    return e.code()

            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(upload, paths))
            won = [r for r in results if isinstance(r, pb.Dataset)]
            assert len(won) == 1, results
            assert [r for r in results if r is not won[0]] == [grpc.StatusCode.ALREADY_EXISTS] * (
                n - 1
            )
            assert sorted(p.name for p in (data / "datasets").iterdir()) == [won[0].sha256]
            assert not any((data / "tmp").iterdir())
            assert [d.id for d in c.list_datasets()] == [won[0].id]

            barrier = threading.Barrier(n)

            def create(_: int):
                barrier.wait(30)
                try:
                    return c.create_job("tiny", won[0].id, "one-name")
                except grpc.RpcError as e:
                    return e.code()

            with ThreadPoolExecutor(n) as pool:
                jobs = list(pool.map(create, range(n)))
            ok = [j for j in jobs if isinstance(j, pb.Job)]
            assert len(ok) == 1, jobs
            assert jobs.count(grpc.StatusCode.ALREADY_EXISTS) == n - 1
            assert [j.id for j in c.list_jobs()] == [ok[0].id]
            c.cancel_job(ok[0].id)
    finally:
        assert svc.stop() == 0
