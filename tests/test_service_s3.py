"""The service with its adapters in object storage (``--adapter-store s3://...``, a real S3
server: Ceph's radosgw, tests/radosgw.py) while that storage goes away: a job that finishes
then is not lost or trained again. It stays RUNNING and says why, publishes as soon as
storage is back, once; and where storage stays away past ``--publish-wait-seconds`` it fails
with the reason and without the storage's endpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.service import QUICK, Service, add_tenant, chat_rows, write_jsonl

if TYPE_CHECKING:
    from tests.radosgw import RadosGateway, S3Bucket

pytest_plugins = ("tests.radosgw",)  # a real S3 server, started only by the test that asks

WAITING = "adapter storage did not answer; publishing again"


def _service(data: Path, model: Path, bucket: S3Bucket, wait_s: float) -> Service:
    extra = ["--adapter-store", f"s3://{bucket.bucket}/adapters"]
    extra += ["--publish-wait-seconds", str(wait_s)]
    return Service(data, {"tiny": str(model)}, extra=extra)


def _wait_for_message(c, job_id: str, text: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = c.get_job(job_id)
        assert job.state != pb.JOB_STATE_FAILED, job.error_message
        if any(text in e.message for e in c.job_events(job_id, settle_s=0.5)):
            return
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} never said {text!r}")


@pytest.mark.slow
def test_storage_down_at_publish_is_waited_out_then_failed_past_the_limit(
    radosgw: RadosGateway,
    s3_bucket: S3Bucket,
    tmp_path: Path,
    tiny_model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in s3_bucket.env().items():
        monkeypatch.setenv(name, value)  # the service process inherits them
    data = tmp_path / "data"
    key = add_tenant(data, "acme")
    rows = write_jsonl(tmp_path / "d.jsonl", chat_rows("q", "a", 16))

    # Storage goes away while the job trains, and comes back while it waits to publish.
    svc = _service(data, tiny_model_dir, s3_bucket, wait_s=600).start()
    try:
        with svc.client(key) as c:
            ds = c.upload_dataset(rows, "d")
            job = c.create_job("tiny", ds.id, "bot", **QUICK)
            radosgw.stop_gateway()  # before the model has loaded
            try:
                _wait_for_message(c, job.id, WAITING)
                assert c.get_job(job.id).state == pb.JOB_STATE_RUNNING
            finally:
                radosgw.start_gateway()
            done = c.wait(job.id, 300)
            assert done.state == pb.JOB_STATE_SUCCEEDED, (done.error_message, svc.log()[-3000:])
            assert done.adapter_version == "v0001"
            events = c.job_events(job.id)
            assert sum(e.message.startswith("started on") for e in events) == 1  # trained once
            assert [v.version for v in c.list_versions("bot")] == ["v0001"]
    finally:
        assert svc.stop() == 0, svc.log()
    listed = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.bucket, Prefix="adapters/")
    assert any(o["Key"].startswith("adapters/acme/bot/v0001/") for o in listed["Contents"])

    # Storage that stays away past the limit: the job fails with the reason; the storage's
    # endpoint is in the log only.
    svc = _service(data, tiny_model_dir, s3_bucket, wait_s=3).start()
    try:
        with svc.client(key) as c:
            job = c.create_job("tiny", ds.id, "bot", **QUICK)
            radosgw.stop_gateway()
            try:
                failed = c.wait(job.id, 300)
            finally:
                radosgw.start_gateway()
            assert failed.state == pb.JOB_STATE_FAILED
            assert "publishing failed: adapter storage did not answer" in failed.error_message
            assert s3_bucket.endpoint not in failed.error_message
            assert any(WAITING in e.message for e in c.job_events(job.id))
            assert [v.version for v in c.list_versions("bot")] == ["v0001"]
    finally:
        assert svc.stop() == 0, svc.log()
    assert s3_bucket.endpoint in svc.log()
