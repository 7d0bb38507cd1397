"""Tenant isolation over every RPC, table-driven from the service descriptor (not a hand list).

Tenant A (acme) owns a dataset, a job and a published adapter. For every RPC the
table builds a request aimed at A's objects, and sends it as tenant B, as an admin
acting for B, as a tenant key claiming to act for A, with no key, a wrong key, a
malformed scheme and the key of a tenant that has been removed. Expected: B's calls
that name A's object answer NOT_FOUND exactly as for a missing object, listings show
none of A's objects, every call without a valid key is UNAUTHENTICATED, nothing of A's
appears in any answer, and A's objects are untouched afterwards.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from finetune.v1 import trainer_pb2 as pb
from tests.service import Service, add_tenant, chat_rows, cli, write_jsonl
from trainer.layout import CURRENT, Layout, write_atomic
from trainer.service.store import AdapterRecord, SqliteStore

Code = grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["Trainer"]
METHODS: list[MethodDescriptor] = list(SERVICE.methods)
ADAPTER = "zebra-secret"
DATASET = "zebra-private-data"
MISSING = {"ds": "ds-00000000deadbeef", "job": "job-00000000deadbeef", "adapter": "no-such-name"}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("iso")
    keys = {
        "A": add_tenant(data, "acme"),
        "B": add_tenant(data, "bolt"),
        "gone": add_tenant(data, "gone"),
        "admin": add_tenant(data, "ops", admin=True),
    }
    # A's published adapter: its folder as the publisher leaves it, and its store record.
    layout = Layout(data).create()
    v1 = layout.version_dir("acme", ADAPTER, "v0001")
    v1.mkdir(parents=True)
    (v1 / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    write_atomic(layout.adapter_dir("acme", ADAPTER) / CURRENT, b"v0001")
    store = SqliteStore(layout.db)
    store.add_adapter(AdapterRecord("acme", ADAPTER, "v0001", "job-0123456789abcdef", "tiny", 1.0))
    store.close()

    svc = Service(data, {"tiny": str(data / "no-model")}).start()
    with svc.client(keys["A"]) as a:
        f = write_jsonl(data / "a.jsonl", chat_rows("the zebra code?", "zebra-771", 12))
        ds = a.upload_dataset(f, DATASET)
        job = a.create_job("tiny", ds.id, "zebra-job")
        a.cancel_job(job.id)  # it never trains; the record is what matters
    cli("tenant", "remove", "gone", data_dir=data)
    secrets = {ds.id, ds.sha256, job.id, ADAPTER, DATASET, "zebra-job", "acme"}
    yield {"svc": svc, "keys": keys, "ds": ds, "job": job, "secrets": secrets}
    assert svc.stop() == 0, svc.log()


def _request(method: MethodDescriptor, target: dict[str, str], upload_as: str = DATASET) -> list:
    """A request aimed at the objects in ``target``, built from the method's descriptor."""
    if method.client_streaming:
        header = pb.UploadDatasetHeader(name=upload_as)  # by default A's name, in B's namespace
        body = b"".join(json.dumps(r).encode() + b"\n" for r in chat_rows("q", "a", 12))
        return [pb.UploadDatasetRequest(header=header), pb.UploadDatasetRequest(chunk=body)]
    msg = message_factory.GetMessageClass(method.input_type)()
    kind = "job" if "Job" in method.name else "ds"
    for f in method.input_type.fields:
        if f.name == "id":
            setattr(msg, f.name, target[kind])
        elif f.name.endswith("dataset_id"):
            setattr(msg, f.name, target["ds"])
        elif f.name in ("name", "adapter"):  # DownloadRequest: its oneof's adapter
            setattr(msg, f.name, target["adapter"])
        elif f.name == "job_id":
            msg.job_id = target["job"]
        elif f.name == "base_model":
            msg.base_model = "tiny"
        elif f.name == "adapter_name":
            msg.adapter_name = "stolen"
    return [msg]


def _call(svc, method: MethodDescriptor, requests: list[Any], md) -> tuple[Code, str, list]:
    path = f"/{SERVICE.full_name}/{method.name}"
    ch = grpc.insecure_channel(svc.addr)
    raw = [r.SerializeToString() for r in requests]
    try:
        if method.client_streaming:
            out = [ch.stream_unary(path)(iter(raw), metadata=md, timeout=20)]
        elif method.server_streaming:
            out = list(ch.unary_stream(path)(raw[0], metadata=md, timeout=20))
        else:
            out = [ch.unary_unary(path)(raw[0], metadata=md, timeout=20)]
    except grpc.RpcError as e:
        return e.code(), e.details() or "", []
    finally:
        ch.close()
    return Code.OK, "", out


def _bearer(key: str, act_as: str | None = None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")] + ([("x-tenant", act_as)] if act_as else [])


def _names_an_object(method: MethodDescriptor) -> bool:
    names = set(method.input_type.fields_by_name)
    return bool(names & {"id", "name", "dataset_id", "adapter", "job_id"})


def test_the_table_covers_every_rpc():
    assert {m.name for m in METHODS} == set(SERVICE.methods_by_name)
    assert len(METHODS) >= 12  # the contract's RPCs, ValidateDataset included


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize("caller", ["tenant B", "admin acting for B"])
def test_b_cannot_reach_as_objects(world, method, caller):
    svc, keys, ds, job = world["svc"], world["keys"], world["ds"], world["job"]
    md = _bearer(keys["B"]) if caller == "tenant B" else _bearer(keys["admin"], "bolt")
    target = {"ds": ds.id, "job": job.id, "adapter": ADAPTER}
    upload_as = DATASET if caller == "tenant B" else "from-admin"
    code, details, out = _call(svc, method, _request(method, target, upload_as), md)
    body = details + "".join(str(type(o)) + o.hex() for o in out)
    decoded = ""
    if code == Code.OK:
        out_cls = message_factory.GetMessageClass(method.output_type)
        decoded = "".join(str(out_cls.FromString(o)) for o in out)
    if _names_an_object(method):
        # Exactly what a missing object of B's own gets, once the asked-for id is masked.
        code_m, details_m, _ = _call(svc, method, _request(method, MISSING), md)
        assert code == code_m == Code.NOT_FOUND, (method.name, code, details)
        for real, missing in ((ds.id, MISSING["ds"]), (job.id, MISSING["job"])):
            details = details.replace(real, "X")
            details_m = details_m.replace(missing, "X")
        assert details.replace(ADAPTER, "X") == details_m.replace(MISSING["adapter"], "X")
        leaked = world["secrets"] - {ds.id, job.id, ADAPTER}
    else:
        # Listings and uploads act in B's own namespace: OK, and nothing of A's in them
        # (B's upload reuses A's dataset name, which B may: names are per tenant).
        assert code == Code.OK, (method.name, code, details)
        leaked = world["secrets"] - {DATASET}
    for s in leaked:
        assert s not in body and s not in decoded, (method.name, s)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_no_valid_key_is_unauthenticated_everywhere(world, method):
    svc, keys, ds, job = world["svc"], world["keys"], world["ds"], world["job"]
    target = {"ds": ds.id, "job": job.id, "adapter": ADAPTER}
    callers = {
        "no key": [],
        "wrong key": _bearer("ft-" + "x" * 43),
        "a key with one character changed": _bearer(keys["A"][:-1] + "?"),
        "Basic scheme": [("authorization", f"Basic {keys['A']}")],
        "key without scheme": [("authorization", keys["A"])],
        "removed tenant": _bearer(keys["gone"]),
        "removed tenant acting for A": _bearer(keys["gone"], "acme"),
        "wrong key acting for A": _bearer("ft-nope", "acme"),
    }
    for who, md in callers.items():
        code, details, _ = _call(svc, method, _request(method, target), md)
        assert code == Code.UNAUTHENTICATED, (method.name, who, code, details)
        for s in world["secrets"]:
            assert s not in details, (method.name, who, s)
    # A tenant key naming another tenant: answered as if that tenant did not exist.
    code, details, _ = _call(svc, method, _request(method, target), _bearer(keys["B"], "acme"))
    assert code == Code.NOT_FOUND, (method.name, code, details)


def test_as_objects_are_untouched(world):
    """Last: after every call above, A still has exactly what it had."""
    svc, keys, ds, job = world["svc"], world["keys"], world["ds"], world["job"]
    with svc.client(keys["A"]) as a:
        assert a.get_dataset(ds.id).sha256 == ds.sha256
        assert [d.name for d in a.list_datasets()] == [DATASET]
        jobs = a.list_jobs()
        assert [j.id for j in jobs] == [job.id] and jobs[0].state == pb.JOB_STATE_CANCELLED
        assert [x.name for x in a.list_adapters()] == [ADAPTER]
    assert (svc.data_dir / "adapters/acme" / ADAPTER / "v0001/adapter_config.json").is_file()
    # B's upload under A's dataset name succeeded in B's own namespace, and no job of B's ran.
    with svc.client(keys["B"]) as b:
        assert sorted(d.name for d in b.list_datasets()) == ["from-admin", DATASET]
        assert b.list_jobs() == []


def test_adapter_names_collide_regardless_of_case(world):
    """A's 'ZEBRA-SECRET' would share a folder with 'zebra-secret' on a case-insensitive
    volume, and two served names would differ only by case: refused up front."""
    svc, keys, ds = world["svc"], world["keys"], world["ds"]
    with svc.client(keys["A"]) as a:
        for twin in ("ZEBRA-SECRET", "Zebra-Secret"):
            with pytest.raises(grpc.RpcError) as e:
                a.create_job("tiny", ds.id, twin)
            assert e.value.code() == Code.ALREADY_EXISTS, e.value.details()
            assert e.value.details().startswith("adapter_name")
        assert len(a.list_jobs()) == 1
