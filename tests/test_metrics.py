"""The RPC interceptor under every kind of call the trainer serves, against a real service.

Unary (Health.Check, GetJob), server streaming written with ``context.write`` (Health.Watch,
cancelled by the client) and bidirectional streaming (reflection): each still answers
through the interceptor, and each is counted under its method and final code.
tests/test_cli.py checks the job figures during a real training run.
"""

from __future__ import annotations

import re
import shutil
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.service import Service, add_tenant
from trainer.memory import gpu_memory
from trainer.service.metrics import gpu_memory_used


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    data = tmp_path_factory.mktemp("metrics-data")
    key = add_tenant(data, "acme")
    service = Service(data, {}, extra=["--metrics-listen", "127.0.0.1:0"]).start()
    assert service.proc is not None and service.proc.stdout is not None
    m = re.search(r"metrics on (http://\S+)", service.proc.stdout.readline())
    assert m
    yield service, key, m.group(1)
    service.stop()


def counts(url: str) -> dict[tuple[str, str], float]:
    out = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            if s.name == "finetune_rpc_duration_seconds_count":
                out[(s.labels["method"], s.labels["code"])] = s.value
    return out


def test_every_kind_of_call_is_answered_and_counted(svc):
    service, key, url = svc
    before = counts(url)
    channel = grpc.insecure_channel(service.addr)
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == 1  # SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest())
    assert next(watch).status == 1
    watch.cancel()
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert "finetune.v1.Trainer" in names
    with service.client(key) as c, pytest.raises(grpc.RpcError) as e:
        c.get_job("job-0123456789abcdef")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    channel.close()

    after = counts(url)
    for _ in range(50):  # the server learns of the cancel asynchronously
        if ("Watch", "CANCELLED") in after:
            break
        time.sleep(0.1)
        after = counts(url)

    def grew(method: str, code: str) -> float:
        return after.get((method, code), 0) - before.get((method, code), 0)

    assert grew("Check", "OK") == 1
    assert grew("ServerReflectionInfo", "OK") == 1
    assert grew("GetJob", "NOT_FOUND") == 1
    assert grew("Watch", "CANCELLED") == 1, after  # the client hung up on the stream


def test_the_metrics_page_is_prometheus_text(svc):
    _, _, url = svc
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"finetune_jobs", "finetune_upload_bytes", "finetune_rpc_duration_seconds"} <= names
    assert "process_resident_memory_bytes" in r.text


def test_gpu_memory_gauge_is_what_the_driver_reports(svc):
    """``finetune_gpu_memory_used_bytes`` has one sample a GPU that NVML reports, none on a
    host without a GPU (this one, in CI)."""
    _, _, url = svc
    gpus = gpu_memory()
    page = text_string_to_metric_families(httpx.get(url, timeout=10).text)
    samples = {
        s.labels["gpu"]: s.value
        for family in page
        for s in family.samples
        if s.name == "finetune_gpu_memory_used_bytes"
    }
    assert sorted(samples) == sorted(str(i) for i in gpus)
    assert sorted(gpu_memory_used(max_age_s=0)) == sorted(gpus)


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU")
def test_gpu_memory_used_is_what_nvidia_smi_reports():
    import subprocess

    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    want = {int(i): int(mib) << 20 for i, mib in (line.split(",") for line in out.splitlines())}
    got = gpu_memory_used(max_age_s=0)
    assert sorted(got) == sorted(want)
    for index, used in got.items():  # nvidia-smi rounds to MiB; others' work may move it
        assert abs(used - want[index]) < 64 << 20, (index, used, want[index])
