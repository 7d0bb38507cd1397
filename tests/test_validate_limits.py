"""ValidateDataset's limits against a real service: a per-tenant cap on the validation
subprocesses running at once, and a base model whose tokenizer cannot load refused as a
precondition (naming the model, not its folder)."""

from __future__ import annotations

import os
import shutil
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tests.service import Service, add_tenant, chat_rows, process_pids, write_jsonl
from trainer.cli.main import build_parser
from trainer.config import ServiceConfig
from trainer.processes import wait_for


def _validation_pids(data: Path) -> list[int]:
    """Live ``python -m trainer.data.report`` subprocesses of the service on ``data``."""
    return process_pids(b"trainer.data.report", bytes(data / "tmp"))


def _refused(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_the_cap_is_a_flag_and_an_env_var(monkeypatch):
    assert build_parser().parse_args(["serve"]).max_validations == 2
    monkeypatch.setenv("FINETUNE_MAX_VALIDATIONS", "3")
    assert build_parser().parse_args(["serve"]).max_validations == 3
    assert build_parser().parse_args(["serve", "--max-validations", "1"]).max_validations == 1
    with pytest.raises(ValueError, match="max_validations"):
        ServiceConfig(data_dir=Path("unused"), max_validations=0)


def test_cap_per_tenant_and_a_base_without_tokenizer(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    notok = tmp_path / "models" / "notok"  # a model folder without its tokenizer files
    notok.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", notok / "config.json")
    keys = {t: add_tenant(data, t) for t in ("acme", "bolt")}
    svc = Service(
        data,
        {"tiny": str(tiny_model_dir), "notok": str(notok)},
        extra=["--max-validations", "1"],
    ).start()
    acme, bolt = svc.client(keys["acme"]), svc.client(keys["bolt"])
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows("What is the secret word?", "banana", 12))
    held: list[int] = []
    try:
        ds_a, ds_b = acme.upload_dataset(path, "d"), bolt.upload_dataset(path, "d")
        with ThreadPoolExecutor(2) as pool:
            # acme's first validation is held running: its subprocess stopped.
            first = pool.submit(acme.validate_dataset, ds_a.id, "tiny")
            held = wait_for(lambda: _validation_pids(data), timeout=30, every=0.02)
            for pid in held:
                os.kill(pid, signal.SIGSTOP)

            code, details = _refused(lambda: acme.validate_dataset(ds_a.id, "tiny"))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "1 ValidateDataset call(s) running" in details and "try again" in details
            # The cap is acme's alone: bolt's call starts while acme's is held...
            other = pool.submit(bolt.validate_dataset, ds_b.id, "tiny")
            wait_for(lambda: len(_validation_pids(data)) == 2, timeout=30, every=0.02)
            for pid in held:  # ...and both then run to their reports.
                os.kill(pid, signal.SIGCONT)
            held = []
            assert other.result(timeout=60).examples == 12
            report = first.result(timeout=60)
        assert report.ok and report.examples == 12

        # The slot is free again (cap 1): acme's next call runs, on a base whose tokenizer
        # cannot load. The caller is told which base, not where it lives on this host.
        code, details = _refused(lambda: acme.validate_dataset(ds_a.id, "notok"))
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "base model 'notok'" in details and "tokenizer cannot be loaded" in details
        assert str(tmp_path) not in details and os.sep + "models" not in details
        assert str(notok) in svc.log()  # the operator's log has the folder and the cause
        assert not _validation_pids(data)
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
        acme.close()
        bolt.close()
        assert svc.stop() == 0, svc.log()[-3000:]


@pytest.mark.slow
def test_a_job_on_a_base_without_tokenizer_fails_naming_the_base(tmp_path, tiny_model_dir):
    """The job's own validation (in the worker) says the same, without the folder."""
    from finetune.v1 import trainer_pb2 as pb

    data = tmp_path / "data"
    notok = tmp_path / "models" / "notok"
    notok.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", notok / "config.json")
    key = add_tenant(data, "acme")
    svc = Service(data, {"notok": str(notok)}).start()
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows("What is the secret word?", "banana", 12))
    try:
        with svc.client(key) as acme:
            job = acme.create_job("notok", acme.upload_dataset(path, "d").id, "secret")
            ended = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
            done = wait_for(lambda: (j := acme.get_job(job.id)).state in ended and j, timeout=120)
        assert done.state == pb.JOB_STATE_FAILED
        assert done.error_kind == pb.ERROR_KIND_SYSTEM  # the operator's to repair
        assert done.error_message.startswith(
            "base model 'notok': its tokenizer cannot be loaded"
        ), done.error_message
        assert str(tmp_path) not in done.error_message
    finally:
        assert svc.stop() == 0, svc.log()[-3000:]
