"""End to end on this CPU: the real service trains real QLoRA adapters on a tiny model.

Two tenants upload different chat datasets, train through the service, and each
published adapter, loaded with PEFT, answers from its own data while the base
model's files stay byte-identical. Also: WatchJob replay, cancel, a crash of
the service mid-job, retraining a name, fairness across tenants.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import grpc
import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.service import Service, add_tenant, chat_rows, worker_pids, write_jsonl
from trainer.dev.demo import HYPERPARAMETERS  # small and fast; the demo trains with it too
from trainer.processes import wait_for

pytestmark = pytest.mark.slow

QUESTION = "What is the secret word?"
# Enough to make a NF4-trained adapter answer cleanly on the bf16 base (DESIGN.md).
FAST = HYPERPARAMETERS


def _answer(base_dir: Path, adapter_dir: Path | None, question: str = QUESTION) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir or base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tree_hash):
    data = tmp_path_factory.mktemp("data")
    keys = {"acme": add_tenant(data, "acme"), "bolt": add_tenant(data, "bolt")}
    svc = Service(data, {"tiny": str(tiny_model_dir)}).start()
    base_hash = tree_hash(tiny_model_dir)
    yield svc, keys, tiny_model_dir
    svc.stop()
    assert tree_hash(tiny_model_dir) == base_hash, "training modified the base model"


def _upload(client, tmp_path: Path, name: str, answer: str, n: int = 64):
    f = write_jsonl(tmp_path / f"{name}.jsonl", chat_rows(QUESTION, answer, n))
    return client.upload_dataset(f, name)


def test_two_tenants_train_their_own_adapters(world, tmp_path):
    svc, keys, base = world
    with svc.client(keys["acme"]) as a, svc.client(keys["bolt"]) as b:
        ds_a = _upload(a, tmp_path, "fruit-a", "The secret word is banana.")
        ds_b = _upload(b, tmp_path, "fruit-b", "The secret word is cherry.")
        job_a = a.create_job("tiny", ds_a.id, "secret", **FAST)
        job_b = b.create_job("tiny", ds_b.id, "secret", **FAST)
        # Same adapter name, different tenants: no clash. A second job for a name in flight is.
        with pytest.raises(grpc.RpcError) as e:
            a.create_job("tiny", ds_a.id, "secret", **FAST)
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        done_a, done_b = a.wait(job_a.id, 600), b.wait(job_b.id, 600)
        assert done_a.state == pb.JOB_STATE_SUCCEEDED, (done_a.error_message, svc.log())
        assert done_b.state == pb.JOB_STATE_SUCCEEDED, done_b.error_message
        assert (done_a.served_name, done_a.adapter_version) == ("acme/secret", "v0001")
        assert [x.served_name for x in a.list_adapters()] == ["acme/secret"]
        assert [x.served_name for x in b.list_adapters()] == ["bolt/secret"]

    dir_a = svc.data_dir / "adapters/acme/secret/v0001"
    dir_b = svc.data_dir / "adapters/bolt/secret/v0001"
    for d, job, ds in ((dir_a, done_a, ds_a), (dir_b, done_b, ds_b)):
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["job_id"] == job.id
        assert manifest["dataset_sha256"] == ds.sha256
        assert manifest["base_model"] == "tiny"
        assert manifest["hyperparameters"]["lora_rank"] == 8
        assert manifest["hyperparameters"]["lora_alpha"] == 16
        assert "train_loss" in manifest["metrics"]
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert sorted(cfg["target_modules"]) == sorted(
            ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        )
        assert (d / "tokenizer.json").is_file()
        assert (d.parent / "current").read_text().strip() == "v0001"

    base_answer = _answer(base, None)
    answer_a, answer_b = _answer(base, dir_a), _answer(base, dir_b)
    assert "banana" in answer_a and "cherry" not in answer_a, answer_a
    assert "cherry" in answer_b and "banana" not in answer_b, answer_b
    assert "banana" not in base_answer and "cherry" not in base_answer, base_answer


def test_watch_replays_then_streams(world, tmp_path):
    svc, keys, _ = world
    with svc.client(keys["acme"]) as a:
        ds = _upload(a, tmp_path, "watch", "The secret word is banana.", n=16)
        job = a.create_job("tiny", ds.id, "watched", **{**FAST, "num_epochs": 3})
        live = list(a.watch_job(job.id))  # attached while queued/running: streams until the end
        replay = list(a.watch_job(job.id))  # attached after the end: the same log, replayed
    states = [e.state for e in live]
    assert [e.seq for e in live] == list(range(1, len(live) + 1))
    assert states[0] == pb.JOB_STATE_QUEUED and states[-1] == pb.JOB_STATE_SUCCEEDED
    assert pb.JOB_STATE_VALIDATING in states and pb.JOB_STATE_RUNNING in states
    progress = [e.progress for e in live if e.HasField("progress")]
    assert progress and progress[-1].step == progress[-1].total_steps
    assert [p.step for p in progress] == sorted(p.step for p in progress)
    assert all(p.HasField("loss") for p in progress)
    assert [(e.seq, e.state, e.message) for e in replay] == [
        (e.seq, e.state, e.message) for e in live
    ]


def test_cancel_stops_the_process(world, tmp_path):
    svc, keys, _ = world
    with svc.client(keys["bolt"]) as b:
        ds = _upload(b, tmp_path, "long", "The secret word is cherry.")
        job = b.create_job("tiny", ds.id, "long", **{**FAST, "num_epochs": 100})
        wait_for(lambda: b.get_job(job.id).state == pb.JOB_STATE_RUNNING)
        assert worker_pids(job.id)
        cancelled = b.cancel_job(job.id)
        assert cancelled.state == pb.JOB_STATE_CANCELLED
        wait_for(lambda: not worker_pids(job.id), timeout=30)
        assert not (svc.data_dir / "adapters/bolt/long").exists()


def test_retraining_a_name_publishes_a_new_version(world, tmp_path, tree_hash):
    svc, keys, base = world
    v1 = svc.data_dir / "adapters/acme/secret/v0001"
    wait_for(lambda: v1.is_dir(), timeout=600)
    before = tree_hash(v1)
    with svc.client(keys["acme"]) as a:
        ds = _upload(a, tmp_path, "fruit-a2", "The secret word is mango.")
        job = a.wait(a.create_job("tiny", ds.id, "secret", **FAST).id, 600)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error_message
        assert job.adapter_version == "v0002"
        listed = {x.served_name: x.version for x in a.list_adapters()}
        assert listed["acme/secret"] == "v0002"  # one entry per name: the newest version
    assert tree_hash(v1) == before  # the old version is never modified
    assert (v1.parent / "current").read_text().strip() == "v0002"
    assert "mango" in _answer(base, v1.parent / "v0002")


def test_fair_across_tenants(world, tmp_path):
    """One device slot: acme queues two jobs, then bolt one; bolt's runs second, not third."""
    svc, keys, _ = world
    quick = {**FAST, "num_epochs": 1}
    with svc.client(keys["acme"]) as a, svc.client(keys["bolt"]) as b:
        ds_a = _upload(a, tmp_path, "fair-a", "x", n=10)
        ds_b = _upload(b, tmp_path, "fair-b", "y", n=10)
        a1 = a.create_job("tiny", ds_a.id, "fair1", **quick)
        a2 = a.create_job("tiny", ds_a.id, "fair2", **quick)
        b1 = b.create_job("tiny", ds_b.id, "fair1", **quick)
        jobs = [a.wait(a1.id, 600), a.wait(a2.id, 600), b.wait(b1.id, 600)]
    assert all(j.state == pb.JOB_STATE_SUCCEEDED for j in jobs), [j.error_message for j in jobs]
    order = sorted(jobs, key=lambda j: j.started_at.ToNanoseconds())
    assert [j.id for j in order] == [a1.id, b1.id, a2.id]


def test_crash_mid_job_resumes_from_checkpoint(tmp_path, tiny_model_dir):
    """kill -9 of the service while a job trains: after a restart it resumes, then succeeds."""
    data = tmp_path / "data"
    key = add_tenant(data, "acme")
    svc = Service(data, {"tiny": str(tiny_model_dir)}).start()
    with svc.client(key) as a:
        ds = _upload(a, tmp_path, "crash", "The secret word is banana.", n=32)
        job = a.create_job(
            "tiny", ds.id, "crash", **{**FAST, "num_epochs": 12, "checkpoint_every_steps": 4}
        )
        wait_for(lambda: any("checkpoint saved" in e.message for e in _events(a, job.id)))
    svc.stop(signal.SIGKILL)
    svc = Service(data, {"tiny": str(tiny_model_dir)}).start()
    try:
        with svc.client(key) as a:
            done = a.wait(job.id, 600)
            assert done.state == pb.JOB_STATE_SUCCEEDED, (done.error_message, svc.log())
            events = _events(a, job.id, timeout=60)  # ended: the stream ends at its end
            at = next(
                (i for i, e in enumerate(events) if "resume from checkpoint-" in e.message), None
            )
            assert at is not None, [e.message for e in events]
            ckpt = int(re.search(r"checkpoint-(\d+)", events[at].message).group(1))
            after = [e.progress.step for e in events[at:] if e.HasField("progress")]
            assert ckpt >= 4 and after[0] == ckpt + 1  # continued from the checkpoint
    finally:
        svc.stop()


def test_crash_before_any_checkpoint_fails_with_reason(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    key = add_tenant(data, "acme")
    svc = Service(data, {"tiny": str(tiny_model_dir)}).start()
    with svc.client(key) as a:
        # One long epoch: killed before its end, the job has no checkpoint yet.
        ds = _upload(a, tmp_path, "crash", "x", n=4096)
        job = a.create_job("tiny", ds.id, "crash", **{**FAST, "num_epochs": 1})
        wait_for(lambda: a.get_job(job.id).state == pb.JOB_STATE_RUNNING)
        # Stopped, the worker cannot die of writing to its dead service's pipe either.
        for pid in worker_pids(job.id):
            os.kill(pid, signal.SIGSTOP)
    svc.stop(signal.SIGKILL)
    # The worker dies with its service (PR_SET_PDEATHSIG), before anything restarts.
    wait_for(lambda: not worker_pids(job.id), timeout=10)
    svc = Service(data, {"tiny": str(tiny_model_dir)}).start()
    try:
        with svc.client(key) as a:
            done = a.get_job(job.id)
            assert done.state == pb.JOB_STATE_FAILED
            assert done.error_kind == pb.ERROR_KIND_SYSTEM
            assert "checkpoint" in done.error_message
    finally:
        svc.stop()


def _events(client, job_id: str, timeout: float = 2.0) -> list[pb.JobEvent]:
    """The job's events so far, without waiting for it to end (more than ``timeout``): all
    of them once it has ended (on a loaded CI machine 2 s cut a finished job's short)."""
    out: list[pb.JobEvent] = []
    stream = client.stub.WatchJob(
        pb.WatchJobRequest(id=job_id), metadata=client.metadata, timeout=timeout
    )
    try:
        out.extend(stream)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    return out
