"""The gRPC contract against a real service process: auth, isolation, uploads, bad input."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from finetune.v1 import trainer_pb2 as pb
from finetune.v1 import trainer_pb2_grpc
from tests.service import Service, add_tenant, chat_rows, write_jsonl

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("data")
    # The path need not hold a model: no test here lets a job train.
    s = Service(data, {"tiny": str(data / "no-model")}, extra=["--max-upload-bytes", "200000"])
    keys = {
        "a": add_tenant(data, "acme"),
        "b": add_tenant(data, "bolt"),
        "admin": add_tenant(data, "ops", admin=True),
    }
    s.start()
    s.keys = keys  # type: ignore[attr-defined]
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture
def a(svc):
    with svc.client(svc.keys["a"]) as c:
        yield c


@pytest.fixture
def b(svc):
    with svc.client(svc.keys["b"]) as c:
        yield c


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def _stored_files(data: Path) -> list[str]:
    return sorted(p.name for p in (data / "datasets").iterdir()) + sorted(
        p.name for p in (data / "tmp").iterdir()
    )


def test_health_and_reflection(svc):
    ch = grpc.insecure_channel(svc.addr)
    health = health_pb2_grpc.HealthStub(ch)
    for service in ("", "finetune.v1.Trainer"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    (resp,) = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {"finetune.v1.Trainer", "grpc.health.v1.Health"} <= names


def test_every_rpc_requires_a_valid_key(svc):
    stub = trainer_pb2_grpc.TrainerStub(grpc.insecure_channel(svc.addr))
    calls = {
        "GetDataset": lambda md: stub.GetDataset(
            pb.GetDatasetRequest(id="ds-0000000000000000"), metadata=md
        ),
        "ListDatasets": lambda md: stub.ListDatasets(pb.ListDatasetsRequest(), metadata=md),
        "DeleteDataset": lambda md: stub.DeleteDataset(
            pb.DeleteDatasetRequest(id="x"), metadata=md
        ),
        "CreateJob": lambda md: stub.CreateJob(pb.CreateJobRequest(), metadata=md),
        "ValidateDataset": lambda md: stub.ValidateDataset(
            pb.ValidateDatasetRequest(), metadata=md
        ),
        "GetJob": lambda md: stub.GetJob(pb.GetJobRequest(id="x"), metadata=md),
        "ListJobs": lambda md: stub.ListJobs(pb.ListJobsRequest(), metadata=md),
        "CancelJob": lambda md: stub.CancelJob(pb.CancelJobRequest(id="x"), metadata=md),
        "WatchJob": lambda md: list(stub.WatchJob(pb.WatchJobRequest(id="x"), metadata=md)),
        "ListAdapters": lambda md: stub.ListAdapters(pb.ListAdaptersRequest(), metadata=md),
        "DeleteAdapter": lambda md: stub.DeleteAdapter(
            pb.DeleteAdapterRequest(name="x"), metadata=md
        ),
        "UploadDataset": lambda md: stub.UploadDataset(
            iter([pb.UploadDatasetRequest(header=pb.UploadDatasetHeader(name="x"))]), metadata=md
        ),
        "ListAdapterVersions": lambda md: stub.ListAdapterVersions(
            pb.ListAdapterVersionsRequest(name="x"), metadata=md
        ),
        "SetServedVersion": lambda md: stub.SetServedVersion(
            pb.SetServedVersionRequest(name="x", version="v0001"), metadata=md
        ),
        "DeleteAdapterVersion": lambda md: stub.DeleteAdapterVersion(
            pb.DeleteAdapterVersionRequest(name="x", version="v0001"), metadata=md
        ),
        "Download": lambda md: list(stub.Download(pb.DownloadRequest(adapter="x"), metadata=md)),
        "ExportMergedModel": lambda md: stub.ExportMergedModel(
            pb.ExportMergedModelRequest(adapter="x"), metadata=md
        ),
        "DeleteExport": lambda md: stub.DeleteExport(
            pb.DeleteExportRequest(job_id="x"), metadata=md
        ),
        "GetUsage": lambda md: stub.GetUsage(pb.GetUsageRequest(), metadata=md),
    }
    assert set(calls) == set(pb.DESCRIPTOR.services_by_name["Trainer"].methods_by_name)
    for name, call in calls.items():
        for md in ([], [("authorization", "Bearer ft-wrong")], [("authorization", "Basic abc")]):
            code, _ = _code(lambda call=call, md=md: call(md))
            assert code == Code.UNAUTHENTICATED, name


def test_upload_roundtrip_and_listing(svc, a, tmp_path):
    f = write_jsonl(tmp_path / "chat.jsonl", chat_rows("hi", "hello", 10))
    ds = a.upload_dataset(f, "chat")
    import hashlib

    assert ds.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert (ds.num_rows, ds.size_bytes, ds.format) == (
        10,
        f.stat().st_size,
        pb.DATASET_FORMAT_MESSAGES,
    )
    assert (svc.data_dir / "datasets" / ds.sha256).read_bytes() == f.read_bytes()
    assert a.get_dataset(ds.id).sha256 == ds.sha256
    assert ds.id in [d.id for d in a.list_datasets()]
    code, details = _code(lambda: a.upload_dataset(f, "CHAT"))
    assert code == Code.ALREADY_EXISTS and "name" in details


def test_upload_over_the_limit_keeps_nothing(svc, a, tmp_path):
    before = _stored_files(svc.data_dir)
    big = write_jsonl(tmp_path / "big.jsonl", chat_rows("q" * 100, "a" * 100, 2000))
    code, details = _code(lambda: a.upload_dataset(big, "big"))
    assert code == Code.RESOURCE_EXHAUSTED, details
    # Without an announced size the stream itself is cut at the limit.
    stub = trainer_pb2_grpc.TrainerStub(grpc.insecure_channel(svc.addr))

    def stream():
        yield pb.UploadDatasetRequest(header=pb.UploadDatasetHeader(name="big2"))
        data = big.read_bytes()
        for i in range(0, len(data), 65536):
            yield pb.UploadDatasetRequest(chunk=data[i : i + 65536])

    code, _ = _code(lambda: stub.UploadDataset(stream(), metadata=a.metadata))
    assert code == Code.RESOURCE_EXHAUSTED
    assert _stored_files(svc.data_dir) == before
    assert "big" not in [d.name for d in a.list_datasets()]


def test_interrupted_upload_keeps_nothing(svc, a, tmp_path):
    before = _stored_files(svc.data_dir)
    stub = trainer_pb2_grpc.TrainerStub(grpc.insecure_channel(svc.addr))
    sent_some = threading.Event()
    release = threading.Event()

    def stream():
        yield pb.UploadDatasetRequest(header=pb.UploadDatasetHeader(name="cut"))
        yield pb.UploadDatasetRequest(chunk=b'{"text": "partial"}\n' * 100)
        sent_some.set()
        release.wait(10)  # hold the stream open until the call is cancelled

    fut = stub.UploadDataset.future(stream(), metadata=a.metadata)
    assert sent_some.wait(10)
    fut.cancel()
    release.set()
    assert fut.cancelled()
    # The server sees the cancellation asynchronously; wait for its clean-up.
    import time

    for _ in range(50):
        if _stored_files(svc.data_dir) == before:
            break
        time.sleep(0.1)
    assert _stored_files(svc.data_dir) == before
    assert "cut" not in [d.name for d in a.list_datasets()]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"text": "ok"}\nnot json\n', "line 2: not JSON"),
        (b'{"text": "ok"}\n[1, 2]\n', "line 2: not a JSON object"),
        (
            b'{"text": "ok"}\n{"prompt": "p", "completion": "c"}\n',
            "line 2: a prompt_completion example in a text file",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: no assistant"),
        (b'{"messages": [{"role": "robot", "content": "hi"}]}\n', "line 1: messages[0].role"),
        (b'{"text": "\xff\xfe"}\n', "line 1: not UTF-8"),
        (b"\n\n", "no examples"),
    ],
)
def test_malformed_dataset_names_the_line(svc, a, tmp_path, content, expected):
    before = _stored_files(svc.data_dir)
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    code, details = _code(lambda: a.upload_dataset(f, "bad"))
    assert code == Code.INVALID_ARGUMENT
    assert expected in details
    assert _stored_files(svc.data_dir) == before


def test_upload_must_start_with_a_header(svc, a):
    stub = trainer_pb2_grpc.TrainerStub(grpc.insecure_channel(svc.addr))
    code, details = _code(
        lambda: stub.UploadDataset(
            iter([pb.UploadDatasetRequest(chunk=b"{}")]), metadata=a.metadata
        )
    )
    assert code == Code.INVALID_ARGUMENT and "header" in details
    for bad in ("..", "a/b", "", "x" * 65, "\uff41dmin"):
        code, details = _code(
            lambda bad=bad: stub.UploadDataset(
                iter([pb.UploadDatasetRequest(header=pb.UploadDatasetHeader(name=bad))]),
                metadata=a.metadata,
            )
        )
        assert code == Code.INVALID_ARGUMENT and "header.name" in details, bad


def test_tenants_are_isolated(svc, a, b, tmp_path):
    f = write_jsonl(tmp_path / "secret.jsonl", chat_rows("secret?", "acme's", 10))
    ds = a.upload_dataset(f, "secret")
    missing = "ds-0123456789abcdef"
    for call in (lambda i: b.get_dataset(i), lambda i: b.delete_dataset(i)):
        code_a, details_a = _code(lambda call=call: call(ds.id))
        code_m, details_m = _code(lambda call=call: call(missing))
        assert code_a == code_m == Code.NOT_FOUND
        assert details_a.replace(ds.id, "X") == details_m.replace(missing, "X")
    assert ds.id not in [d.id for d in b.list_datasets()]
    code, _ = _code(lambda: b.create_job("tiny", ds.id, "steal"))
    assert code == Code.NOT_FOUND
    # A tenant key cannot act for another tenant; an admin key can.
    with svc.client(svc.keys["b"], tenant="acme") as b_as_a:
        assert _code(b_as_a.list_datasets)[0] == Code.NOT_FOUND
    with svc.client(svc.keys["admin"], tenant="acme") as admin:
        assert ds.id in [d.id for d in admin.list_datasets()]
    assert a.get_dataset(ds.id).sha256 == ds.sha256  # untouched


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        ({"base_model": "gpt-5"}, Code.INVALID_ARGUMENT, "base_model"),
        ({"dataset_id": "ds-ffffffffffffffff"}, Code.NOT_FOUND, "dataset_id"),
        ({"dataset_id": "../etc"}, Code.INVALID_ARGUMENT, "dataset_id"),
        ({"adapter_name": ".."}, Code.INVALID_ARGUMENT, "adapter_name"),
        ({"adapter_name": "a/b"}, Code.INVALID_ARGUMENT, "adapter_name"),
        ({"adapter_name": ""}, Code.INVALID_ARGUMENT, "adapter_name"),
        ({"adapter_name": "n" * 65}, Code.INVALID_ARGUMENT, "adapter_name"),
        ({"adapter_name": "caf\u00e9"}, Code.INVALID_ARGUMENT, "adapter_name"),
        ({"lora_rank": 12}, Code.INVALID_ARGUMENT, "hyperparameters.lora_rank"),
        ({"lora_rank": 128}, Code.INVALID_ARGUMENT, "hyperparameters.lora_rank"),
        ({"learning_rate": -1e-4}, Code.INVALID_ARGUMENT, "hyperparameters.learning_rate"),
        ({"num_epochs": 0}, Code.INVALID_ARGUMENT, "hyperparameters.num_epochs"),
        ({"lora_dropout": 1.5}, Code.INVALID_ARGUMENT, "hyperparameters.lora_dropout"),
        ({"target_modules": ["lm_head"]}, Code.INVALID_ARGUMENT, "hyperparameters.target_modules"),
    ],
)
def test_create_job_bad_input(svc, a, tmp_path, kwargs, code, field):
    name = f"hp{abs(hash(json.dumps(kwargs, sort_keys=True))) % 10**8}"
    ds = a.upload_dataset(write_jsonl(tmp_path / "d.jsonl", chat_rows("q", "a", 10)), name)
    args = {"base_model": "tiny", "dataset_id": ds.id, "adapter_name": "ok"}
    hp = {k: v for k, v in kwargs.items() if k not in args}
    args.update({k: v for k, v in kwargs.items() if k in args})
    before = a.list_jobs()
    got, details = _code(
        lambda: a.create_job(args["base_model"], args["dataset_id"], args["adapter_name"], **hp)
    )
    assert got == code, details
    assert details.startswith(field), details
    assert len(a.list_jobs()) == len(before)


def test_unknown_job_and_adapter(a, b):
    for call in (
        lambda: a.get_job("job-0123456789abcdef"),
        lambda: a.cancel_job("job-0123456789abcdef"),
        lambda: list(a.watch_job("job-0123456789abcdef")),
        lambda: a.delete_adapter("nothing"),
    ):
        assert _code(call)[0] == Code.NOT_FOUND
    assert _code(lambda: a.get_job("../../x"))[0] == Code.INVALID_ARGUMENT
    assert _code(lambda: a.delete_adapter("../b"))[0] == Code.INVALID_ARGUMENT
