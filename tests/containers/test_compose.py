"""The CPU stack as a user runs it: images built from this checkout, `docker compose up`,
and docs/deploy.md's walk through the published ports (`make test-containers`).

Needs only a Docker engine with Compose v2 (`.ci/run` starts one where none answers).
The stack runs under a project name of its own, on free ports, and is taken down with its
volumes at the end; the images stay (tagged as the compose file says) as a build cache.
``FINETUNE_COMPOSE_OVERLAY`` names extra compose files (``:``-separated) laid over
docker-compose.cpu.yml, for a host that builds from a mirror (``.ci/run`` uses it on
machines without an image registry). The figures (build time, image sizes, start to
healthy, the walk's steps) are printed at the end and written to ``FINETUNE_FIGURES``
if that names a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from finetune.v1 import trainer_pb2 as pb
from tests.containers.images import ROOT, differences, installed, python_version, require_docker
from trainer.cli.client import TrainerClient
from trainer.dev.demo import HYPERPARAMETERS, QUESTION
from trainer.processes import free_port, wait_for

pytestmark = pytest.mark.containers

CPU_FILE = ROOT / "docker-compose.cpu.yml"
BASE = "tiny"  # docker-compose.cpu.yml's --served-model-name
ANSWER = "The secret word is banana."  # examples/secret.jsonl
UID = "10001"  # the Dockerfile's `USER`
CPU_IMAGES = ("finetune-service/trainer:cpu", "finetune-service/server:cpu")
# Packages the image removes on purpose after installing the tested set (Dockerfile,
# deps-cpu): CUDA Triton and the vision/audio packages built for another torch.
REMOVED = {"triton", "torchvision", "torchaudio", "torchcodec"}


@dataclass
class Stack:
    """One compose project of the CPU stack, driven through its published ports."""

    files: list[Path]
    project: str
    env: dict[str, str]
    figures: dict[str, object] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 900, check: bool = True) -> str:
        cmd = ["docker", "compose", "-p", self.project]
        for f in self.files:
            cmd += ["-f", str(f)]
        out = subprocess.run(
            [*cmd, *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if check and out.returncode:
            raise AssertionError(f"docker compose {' '.join(args)}: {out.returncode}\n"
                                 f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")  # fmt: skip
        return out.stdout

    def timed(self, name: str, *args: str, timeout: float = 900) -> str:
        start = time.monotonic()
        out = self.compose(*args, timeout=timeout)
        self.figures[name + "_s"] = round(time.monotonic() - start, 1)
        return out

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).strip()

    def add_tenant(self, name: str, admin: bool = False) -> str:
        # The README's way: `docker compose run --rm trainer tenant add NAME`, key on stdout.
        args = ["run", "--rm", "-T", "--no-deps", "trainer", "tenant", "add", name]
        return self.compose(*args, *(["--admin"] if admin else [])).strip()

    @property
    def trainer(self) -> str:
        return f"127.0.0.1:{self.env['TRAINER_PORT']}"

    @property
    def vllm_url(self) -> str:
        return f"http://127.0.0.1:{self.env['VLLM_PORT']}/v1"

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.vllm_url, api_key=key, max_retries=0, timeout=120)


def _healthy(stack: Stack, service: str) -> bool:
    cid = stack.container(service)
    if not cid:
        return False
    out = subprocess.run(
        ["docker", "inspect", "-f", "{{.State.Health.Status}}", cid], capture_output=True,
        text=True,
    )  # fmt: skip
    return out.stdout.strip() == "healthy"


def _answer(client: openai.OpenAI, model: str) -> str:
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
        temperature=0,
    )  # fmt: skip
    return out.choices[0].message.content or ""


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    require_docker()
    overlay = [Path(p).resolve() for p in os.environ.get("FINETUNE_COMPOSE_OVERLAY", "").split(":")
               if p]  # fmt: skip
    ports = {k: str(free_port()) for k in ("TRAINER_PORT", "VLLM_PORT", "TRAINER_METRICS_PORT")}
    env = {**os.environ, **ports, "PUBLISH_ADDRESS": "127.0.0.1", "FINETUNE_VLLM_ADMIN_KEY": ""}
    env.pop("COMPOSE_FILE", None)
    s = Stack([CPU_FILE, *overlay], f"finetune-test-{os.getpid()}", env)
    s.compose("down", "-v", "--remove-orphans", check=False)
    try:
        s.timed("build", "--progress", "plain", "build", timeout=1800)
        for image in CPU_IMAGES:
            size = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", image],
                                  capture_output=True, text=True, check=True).stdout  # fmt: skip
            s.figures[f"image_gb {image}"] = round(int(size) / 1e9, 2)
        # docs/deploy.md's order: an admin key for the trainer to hot-load adapters into vLLM
        # (in .env there; the environment here), the tenants' keys, then `up`.
        s.env["FINETUNE_VLLM_ADMIN_KEY"] = s.add_tenant("ops", admin=True)
        yield s
    finally:
        if sys.exc_info()[0] is not None or request.session.testsfailed:
            print(s.compose("logs", "--no-color", "--tail", "200", check=False)[-20000:])
        s.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)
        print("container figures:", json.dumps(s.figures, indent=1))
        if out := os.environ.get("FINETUNE_FIGURES"):
            Path(out).write_text(json.dumps(s.figures, indent=1) + "\n")


@pytest.fixture(scope="module")
def keys(stack: Stack) -> dict[str, str]:
    return {t: stack.add_tenant(t) for t in ("acme", "bolt")}


@pytest.fixture(scope="module")
def up(stack: Stack, keys: dict[str, str]) -> Stack:
    stack.timed("up_to_healthy", "up", "-d", "--wait", timeout=900)
    return stack


@pytest.fixture(scope="module")
def trained(up: Stack, keys: dict[str, str]) -> dict[str, str]:
    """acme's adapter, trained from docs/deploy.md's dataset through the published port."""
    with TrainerClient(up.trainer, keys["acme"]) as c:
        ds = c.upload_dataset(ROOT / "examples" / "secret.jsonl", "secret")
        start = time.monotonic()
        job = c.create_job(BASE, ds.id, "secret", **HYPERPARAMETERS)
        job = c.wait(job.id, timeout=900)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job
        up.figures["job_to_succeeded_s"] = round(time.monotonic() - start, 1)
        assert job.served_name == "acme/secret"
        # The trainer hot-loaded it with the admin key: the first token comes at once.
        start = time.monotonic()
        stream = up.openai(keys["acme"]).completions.create(
            model=job.served_name, prompt=QUESTION, max_tokens=4, stream=True
        )
        next(iter(stream))
        up.figures["succeeded_to_first_token_s"] = round(time.monotonic() - start, 2)
        return {"dataset": ds.id, "job": job.id, "adapter": job.served_name}


def test_the_images_hold_exactly_the_tested_set(stack: Stack) -> None:
    """Every package in both images is constraints/cpu.txt's version (what CI tests), on
    the Python CI runs, and the packages the Dockerfile removes are gone."""
    for image in CPU_IMAGES:
        assert not differences(image, ROOT / "constraints" / "cpu.txt"), image
        assert not REMOVED & installed(image).keys(), image
        assert python_version(image) == str(sys.version_info[:2]), image


def test_both_run_unprivileged_and_the_trainer_reports_serving(up: Stack) -> None:
    for service in ("trainer", "vllm"):
        assert up.compose("exec", "-T", service, "id", "-u").strip() == UID
        assert _healthy(up, service)
    with grpc.insecure_channel(up.trainer) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10)  # fmt: skip
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_tenants_adapter_answers_and_no_one_else_gets_it(
    up: Stack, keys: dict[str, str], trained: dict[str, str]
) -> None:
    acme, bolt = up.openai(keys["acme"]), up.openai(keys["bolt"])
    name = trained["adapter"]
    assert ANSWER in _answer(acme, name)
    assert ANSWER not in _answer(acme, BASE)
    # Streaming chat and both kinds of completions, through the official client.
    chunks = acme.chat.completions.create(
        model=name, messages=[{"role": "user", "content": QUESTION}], max_tokens=12,
        temperature=0, stream=True,
    )  # fmt: skip
    assert ANSWER in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The plain completions route, streamed and not: the same greedy text, not the base's.
    text = acme.completions.create(model=name, prompt=QUESTION, max_tokens=12, temperature=0)
    streamed = acme.completions.create(
        model=name, prompt=QUESTION, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    base = acme.completions.create(model=BASE, prompt=QUESTION, max_tokens=12, temperature=0)
    assert text.choices[0].text != base.choices[0].text
    # Another tenant: exactly like an adapter that does not exist.
    for model in (name, "acme/nothing-here"):
        with pytest.raises(openai.NotFoundError):
            _answer(bolt, model)
    assert name not in {m.id for m in bolt.models.list()}
    assert name in {m.id for m in acme.models.list()}
    with pytest.raises(openai.AuthenticationError):
        _answer(up.openai("not-a-key"), BASE)


# Each process of the container: its command line, whether tcmalloc and Intel's OpenMP
# are mapped, and whether any of its memory is bound to a NUMA node.
_PROCESSES = """
import glob, json
for d in glob.glob("/proc/[0-9]*"):
    try:
        cmd = open(d + "/cmdline").read().replace(chr(0), " ")
        maps, numa = open(d + "/maps").read(), open(d + "/numa_maps").read()
    except OSError:
        continue
    print(json.dumps({"cmd": cmd, "tcmalloc": "libtcmalloc_minimal" in maps,
                      "iomp": "libiomp5" in maps, "bound": " bind:" in numa}))
"""


def test_vllm_cpu_runs_with_its_preloads_and_numa_binding(up: Stack) -> None:
    """What vLLM-CPU asks for (docker-compose.cpu.yml): tcmalloc and Intel OpenMP in every
    vLLM process, and its worker's memory bound to its NUMA node (set_mempolicy, which
    Docker's seccomp profile allows with SYS_NICE)."""
    out = up.compose("exec", "-T", "vllm", "python", "-c", _PROCESSES)
    procs = [json.loads(line) for line in out.splitlines()]
    # The API server, then its engine core and worker by their process titles.
    vllm = [p for p in procs if "vllm" in p["cmd"].lower()]
    assert len(vllm) >= 3, procs
    assert all(p["tcmalloc"] and p["iomp"] for p in vllm), vllm
    assert any(p["bound"] for p in vllm), vllm
    assert "not found in LD_PRELOAD" not in up.compose("logs", "--no-color", "vllm")


def test_a_crashed_vllm_is_restarted_and_serves_the_same_adapters(
    up: Stack, keys: dict[str, str], trained: dict[str, str]
) -> None:
    """vLLM's server process killed as the OOM killer would: the restart policy brings the
    container back. (`docker kill` would not do: Docker counts it as a manual stop, which
    a restart policy leaves alone.)"""
    cid = up.container("vllm")
    # PID 1 is the compose file's init (tini); its one child is `python -m server`.
    up.compose("exec", "-T", "vllm", "sh", "-c", "kill -KILL $(cat /proc/1/task/1/children)")
    start = time.monotonic()

    def restarted() -> bool:
        out = subprocess.run(["docker", "inspect", "-f", "{{.RestartCount}}", cid],
                             capture_output=True, text=True)  # fmt: skip
        return out.stdout.strip() not in ("", "0") and _healthy(up, "vllm")

    wait_for(restarted, timeout=600, every=1)
    up.figures["killed_vllm_to_healthy_s"] = round(time.monotonic() - start, 1)
    assert up.container("vllm") == cid  # the same container, restarted by its policy
    assert ANSWER in _answer(up.openai(keys["acme"]), trained["adapter"])


def test_down_and_up_keep_datasets_jobs_and_adapters(
    up: Stack, keys: dict[str, str], trained: dict[str, str]
) -> None:
    up.timed("down", "down", "-t", "30")
    assert not up.container("trainer")
    up.timed("up_again_to_healthy", "up", "-d", "--wait", timeout=900)
    with TrainerClient(up.trainer, keys["acme"]) as c:
        assert trained["dataset"] in {d.id for d in c.list_datasets()}
        assert c.get_job(trained["job"]).served_name == trained["adapter"]
        assert trained["adapter"] in {a.served_name for a in c.list_adapters()}
    assert ANSWER in _answer(up.openai(keys["acme"]), trained["adapter"])
