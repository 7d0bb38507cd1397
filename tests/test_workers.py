"""Several trainer services on one PostgreSQL job store and one shared volume (standing in
for hosts that share storage): a service killed with SIGKILL loses its job when its lease
lapses, and another takes it over from the newest checkpoint; a service paused (SIGSTOP)
past its lease finds the job taken when it wakes, stops its run and writes nothing more.
Real processes only: PostgreSQL, the services and their training workers."""

from __future__ import annotations

import os
import re
import signal

import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.service import Service, add_tenant, chat_rows, process_pids, worker_pids, write_jsonl
from trainer.dev.demo import HYPERPARAMETERS
from trainer.layout import Layout
from trainer.processes import wait_for

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.postgres"]

LEASE_S = "3"
# Many short steps with a checkpoint every 4: a takeover has a checkpoint to start from.
LONG = {**HYPERPARAMETERS, "num_epochs": 12, "checkpoint_every_steps": 4}


def _service(data, tiny_model_dir, dsn: str, name: str) -> Service:
    extra = ["--job-store", dsn, "--worker-id", name, "--lease-seconds", LEASE_S]
    return Service(data, {"tiny": str(tiny_model_dir)}, extra=extra).start()


def _start_job(svc: Service, key: str, tmp_path, name: str) -> str:
    with svc.client(key) as c:
        f = write_jsonl(tmp_path / f"{name}.jsonl", chat_rows("The word?", "banana", 32))
        job = c.create_job("tiny", c.upload_dataset(f, name).id, name, **LONG)
        wait_for(lambda: any("checkpoint saved" in e.message for e in c.job_events(job.id)),
                 timeout=300)  # fmt: skip
    return job.id


def test_a_killed_services_job_is_taken_over_from_its_checkpoint(
    tmp_path, tiny_model_dir, postgres_dsn
):
    data = tmp_path / "data"
    key = add_tenant(data, "acme")
    a = _service(data, tiny_model_dir, postgres_dsn, "host-a")
    job_id = _start_job(a, key, tmp_path, "moved")
    b = _service(data, tiny_model_dir, postgres_dsn, "host-b")
    try:
        a.stop(signal.SIGKILL)  # its worker dies with it (PR_SET_PDEATHSIG)
        with b.client(key) as c:
            done = c.wait(job_id, 600)
            assert done.state == pb.JOB_STATE_SUCCEEDED, (done.error_message, b.log()[-3000:])
            messages = [e.message for e in c.job_events(job_id)]
        starts = [m for m in messages if m.startswith("started on")]
        assert starts[0] == "started on cpu of host-a", messages
        assert len(starts) == 2 and starts[1].startswith("started on cpu of host-b, attempt 2")
        ckpt = int(re.search(r"from checkpoint-(\d+)", starts[1]).group(1))
        assert ckpt >= 4
        at = messages.index(starts[1])
        with b.client(key) as c:
            progress = [e for e in c.job_events(job_id)[at:] if e.HasField("progress")]
        assert progress[0].progress.step == ckpt + 1  # continued, not started over
        assert done.adapter_version == "v0001"
    finally:
        b.stop()


def test_a_paused_service_finds_its_job_taken_and_writes_nothing_more(
    tmp_path, tiny_model_dir, postgres_dsn
):
    data = tmp_path / "data"
    key = add_tenant(data, "acme")
    a = _service(data, tiny_model_dir, postgres_dsn, "host-a")
    job_id = _start_job(a, key, tmp_path, "paused")
    (first_worker,) = worker_pids(job_id)
    b = _service(data, tiny_model_dir, postgres_dsn, "host-b")
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        with b.client(key) as c:
            # B takes the job over once A's lease has lapsed.
            wait_for(lambda: c.get_job(job_id).progress.step > 0
                     and any("host-b" in e.message for e in c.job_events(job_id)),
                     timeout=120)  # fmt: skip
            taken = len(c.job_events(job_id))
            os.kill(a.proc.pid, signal.SIGCONT)
            # A's heartbeat finds the lease gone: its own run is stopped...
            wait_for(lambda: first_worker not in worker_pids(job_id), timeout=30)
            done = c.wait(job_id, 600)
            assert done.state == pb.JOB_STATE_SUCCEEDED, (done.error_message, b.log()[-3000:])
            events = c.job_events(job_id)
        # ... and nothing of A's was written after B's claim: every start after it is B's.
        later = [e.message for e in events[taken - 1 :] if e.message.startswith("started on")]
        assert all("host-b" in m for m in later), later
        assert "is not this worker's any more" in a.log()
        # The attempts worked in folders of their own; the checkpoints went at publish.
        layout = Layout(data)
        assert [f.root.name for f in layout.attempts(job_id)][1:] == ["attempt-2"]
        assert not any(f.checkpoints.exists() for f in layout.attempts(job_id))
        assert not process_pids(b"trainer.training.worker", job_id.encode())
        # A stops cleanly, and leaves B's finished job as it is on the way out.
        assert a.stop() == 0, a.log()[-3000:]
        with b.client(key) as c:
            assert c.get_job(job_id).state == pb.JOB_STATE_SUCCEEDED
    finally:
        if a.proc is not None and a.proc.poll() is None:
            os.kill(a.proc.pid, signal.SIGCONT)
            a.stop()
        b.stop()
