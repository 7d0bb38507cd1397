"""Several trainer services on one PostgreSQL job store and one shared volume (standing in
for hosts that share storage): a service killed with SIGKILL loses its job when its lease
lapses, and another takes it over from the newest checkpoint; a service paused (SIGSTOP)
past its lease finds the job taken when it wakes, stops its run and writes nothing more.
Then hosts that share no volume: datasets, checkpoints and adapters in object storage
(radosgw), and the job still moves from a killed host to the other, from its checkpoint.
Real processes only: PostgreSQL, radosgw, the services and their training workers."""

from __future__ import annotations

import os
import re
import signal

import openai
import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.server.conftest import VllmServer
from tests.service import Service, add_tenant, chat_rows, process_pids, worker_pids, write_jsonl
from trainer.dev.demo import HYPERPARAMETERS
from trainer.layout import Layout
from trainer.processes import wait_for

pytestmark = pytest.mark.slow
pytest_plugins = ["tests.postgres", "tests.radosgw"]

LEASE_S = "3"
# Many short steps with a checkpoint every 4: a takeover has a checkpoint to start from.
LONG = {**HYPERPARAMETERS, "num_epochs": 12, "checkpoint_every_steps": 4}


def _service(data, tiny_model_dir, dsn: str, name: str, extra: list[str] = ()) -> Service:
    extra = ["--job-store", dsn, "--worker-id", name, "--lease-seconds", LEASE_S, *extra]
    return Service(data, {"tiny": str(tiny_model_dir)}, extra=extra).start()


def _start_job(svc: Service, key: str, tmp_path, name: str, until: str = "checkpoint saved") -> str:
    with svc.client(key) as c:
        f = write_jsonl(tmp_path / f"{name}.jsonl", chat_rows("The word?", "banana", 32))
        job = c.create_job("tiny", c.upload_dataset(f, name).id, name, **LONG)
        wait_for(lambda: any(until in e.message for e in c.job_events(job.id)), timeout=300)
    return job.id


def _resumed_from(c, job_id: str) -> int:
    """The checkpoint the second attempt started from (and it continued from there)."""
    messages = [e.message for e in c.job_events(job_id)]
    starts = [m for m in messages if m.startswith("started on")]
    assert starts[0] == "started on cpu of host-a", messages
    assert len(starts) == 2 and starts[1].startswith("started on cpu of host-b, attempt 2")
    ckpt = int(re.search(r"from checkpoint-(\d+)", starts[1]).group(1))
    at = messages.index(starts[1])
    progress = [e for e in c.job_events(job_id)[at:] if e.HasField("progress")]
    assert progress[0].progress.step == ckpt + 1  # continued, not started over
    return ckpt


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
            assert _resumed_from(c, job_id) >= 4
        assert done.adapter_version == "v0001"
    finally:
        b.stop()


@pytest.mark.vllm
def test_a_job_moves_to_a_host_that_shares_no_volume(
    tmp_path, tiny_model_dir, postgres_dsn, s3_bucket, monkeypatch
):
    """Host A receives the dataset and starts the job, and dies; host B finishes it from
    what object storage holds; a vLLM replica on host C serves the adapter from there.
    Each host has DATA of its own; tenants, job files and adapters are in S3."""
    for name, value in s3_bucket.env().items():
        monkeypatch.setenv(name, value)  # the services inherit the endpoint and keys
    # The CLI, the services and vLLM's middleware all read the tenants from there.
    monkeypatch.setenv("FINETUNE_TENANTS_STORE", f"s3://{s3_bucket.bucket}/ops")
    stores = ["--adapter-store", f"s3://{s3_bucket.bucket}/adapters",
              "--job-files", f"s3://{s3_bucket.bucket}/files"]  # fmt: skip
    data_a, data_b = tmp_path / "a", tmp_path / "b"
    key = add_tenant(data_a, "acme")
    a = _service(data_a, tiny_model_dir, postgres_dsn, "host-a", stores)
    # A's run has kept a checkpoint in object storage when A dies.
    job_id = _start_job(a, key, tmp_path, "moved", until="kept in object storage")
    b = _service(data_b, tiny_model_dir, postgres_dsn, "host-b", stores)
    try:
        with b.client(key) as c:  # a dataset A received, validated through B
            dataset_id = c.get_job(job_id).dataset_id
            assert c.validate_dataset(dataset_id, "tiny").examples == 32
        a.stop(signal.SIGKILL)
        data_a.rename(tmp_path / "a-gone")  # nothing of A's is where B could reach it
        with b.client(key) as c:
            done = c.wait(job_id, 600)
            assert done.state == pb.JOB_STATE_SUCCEEDED, (done.error_message, b.log()[-3000:])
            ckpt = _resumed_from(c, job_id)
            kept = [int(m.group(1)) for e in c.job_events(job_id)
                    if (m := re.match(r"checkpoint-(\d+) kept in object", e.message))]  # fmt: skip
            assert ckpt >= 4 and ckpt in kept, (ckpt, kept)
            assert [v.version for v in c.list_versions("moved")] == ["v0001"]
    finally:
        b.stop()
    # B had nothing of A's on its volume: it fetched the dataset and the checkpoint.
    layout_b = Layout(data_b)
    assert not layout_b.tenants_file.exists()  # and no tenants file on either
    assert len(list(layout_b.datasets.iterdir())) == 1
    assert not layout_b.attempt(job_id, 1).spec.exists()  # attempt 1 ran on A only
    assert layout_b.attempt(job_id, 2).spec.exists()
    listing = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.bucket)
    keys = {o["Key"] for o in listing["Contents"]}
    assert "adapters/acme/moved/v0001/manifest.json" in keys
    # Published: the checkpoints kept for the job are gone; the dataset stays (its record does).
    assert not any(k.startswith("files/jobs/") for k in keys), sorted(keys)
    assert sum(k.startswith("files/datasets/") for k in keys) == 1

    # Host C: a vLLM replica with the same adapter store serves what B trained.
    data_c = Layout(tmp_path / "c").create()
    adapters = {"FINETUNE_ADAPTER_STORE": f"s3://{s3_bucket.bucket}/adapters"}
    replica = VllmServer(model=tiny_model_dir, data_dir=data_c.root, env=adapters).start()
    try:
        client = openai.OpenAI(base_url=replica.url + "/v1", api_key=key, max_retries=0)
        out = client.completions.create(
            model="acme/moved", prompt="The word?", max_tokens=4, temperature=0
        )
        assert out.model == "acme/moved" and out.usage is not None
        assert 1 <= out.usage.completion_tokens <= 4
    finally:
        replica.stop()
    assert (data_c.adapter_cache / "acme" / "moved" / "v0001" / "adapter_config.json").exists()
    assert not data_c.tenants_file.exists()


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
