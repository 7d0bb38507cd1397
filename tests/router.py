"""Routers in front of vLLM replicas, for tests and ``bench/router.py``.

``HAProxy`` is the product's router (docs/scale.md says why): Debian's HAProxy 2.6 hashing
on the request body's ``model``, so each ``<tenant>/<adapter>`` stays on one replica with
no help from the client. ``VllmRouter`` is the vLLM project's router (``vllm-router``
0.1.17, ``pip install vllm-router==0.1.17``), measured against it by the benchmark.

Both run as real processes on a free loopback port, each alone in its process group.
``cold_loads`` and ``loaded_adapters`` say which replica loaded which adapter.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from trainer.processes import free_port

# The product's HAProxy configuration; docs/scale.md and docker-compose.serving.yml show it.
# - http-buffer-request: the body is read before a server is chosen, so `balance hash` can
#   see `model`. json_query finds it in a body cut at the buffer as long as `model` comes
#   before the cut (the openai client sends it first); a larger tune.bufsize keeps longer
#   bodies whole. A body without `model` where HAProxy can read it falls back to round
#   robin: a cold load, never an error.
# - hash-type consistent: a replica that goes or comes back moves only its own adapters.
# - timeout check: a health check may take that long. Unset, HAProxy gives a check only
#   `inter` (1 s, or the tests' 200 ms): a replica busy generating answers /health slower
#   than that, is marked down while it works, and its adapters move (cold loads elsewhere).
#   A replica that died refuses the connection at once, so failover stays as quick.
# - retries + redispatch + retry-on: a request whose replica refuses the connection or
#   dies before answering is sent to another one (completions have no side effects).
HAPROXY_CONFIG = """\
global
    log stderr format short local0 info
    tune.bufsize {bufsize}

defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout check 5s
    timeout http-request 60s
    timeout client 10m
    timeout server 10m
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend openai
    bind {host}:{port}
    option http-buffer-request
    default_backend vllm

backend vllm
    balance hash req.body,json_query('$.model')
    hash-type consistent
    option httpchk GET /health
    http-check expect status 200
    default-server inter {check_ms}ms fall 2 rise 2
{servers}
"""


def haproxy_config(
    backends: list[str],
    port: int,
    host: str = "127.0.0.1",
    bufsize: int = 256 << 10,
    check_ms: int = 1000,
) -> str:
    """The configuration for ``backends`` (``host:port`` each), named r1, r2, ... in order."""
    servers = "\n".join(f"    server r{i} {b} check" for i, b in enumerate(backends, 1))
    return HAPROXY_CONFIG.format(
        host=host, port=port, bufsize=bufsize, check_ms=check_ms, servers=servers
    )


def find_haproxy() -> str | None:
    return os.environ.get("FINETUNE_HAPROXY") or shutil.which("haproxy")


def find_vllm_router() -> str | None:
    """``vllm-router`` beside this Python (a virtualenv not on PATH) or on PATH."""
    beside = Path(sys.executable).parent / "vllm-router"
    return str(beside) if beside.exists() else shutil.which("vllm-router")


def require_haproxy() -> str:
    """HAProxy's binary, or a skip saying how to get it (a failure where CI requires it)."""
    found = find_haproxy()
    if found:
        return found
    why = "HAProxy is not installed (`apt-get install haproxy`, or set FINETUNE_HAPROXY)"
    if os.environ.get("FINETUNE_REQUIRE_HAPROXY") == "1":
        pytest.fail(f"FINETUNE_REQUIRE_HAPROXY=1 but {why}", pytrace=False)
    pytest.skip(why)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop_group(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


# `option httplog`: ... fe vllm/r2 0/0/0/60/61 200 676 - - ---- 1/1/0/0/+1 0/0 "POST ...
_HTTPLOG = re.compile(r" vllm/(\S+) \S+ (\d{3}) \d+ \S+ \S+ \S+ \d+/\d+/\d+/\d+/(\+?\d+) ")


@dataclass
class HAProxy:
    """HAProxy in the foreground (``-db``) with the product's configuration."""

    backends: list[str]
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="haproxy-")))
    port: int = 0
    bufsize: int = 256 << 10
    check_ms: int = 1000
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "haproxy.log"

    def start(self, timeout: float = 30.0) -> HAProxy:
        binary = require_haproxy()
        self.port = self.port or free_port()
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(haproxy_config(self.backends, self.port, bufsize=self.bufsize,
                                      check_ms=self.check_ms))  # fmt: skip
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy -c refused the configuration:\n{check.stderr}")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "-f", str(cfg), "-db"],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited:\n{self.log_text()}")
            if _port_open(self.port):
                return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"haproxy not listening after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def requests(self) -> list[tuple[str, int, str]]:
        """Each logged request, in order: its server (``r1``, ...), status and retries
        (HAProxy's field: ``+1`` is one retry that was redispatched to another server)."""
        return [
            (srv, int(status), retries)
            for srv, status, retries in _HTTPLOG.findall(self.log_text())
        ]

    def served_by(self) -> list[str]:
        """The server of each logged request, in order."""
        return [srv for srv, _, _ in self.requests()]

    def stop(self) -> None:
        _stop_group(self.proc)
        self.proc = None


@dataclass
class VllmRouter:
    """``vllm-router`` (0.1.17) with one policy in front of ``worker_urls``."""

    worker_urls: list[str]
    policy: str = "consistent_hash"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="vllm-router-")))
    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "vllm-router.log"

    def start(self, timeout: float = 60.0) -> VllmRouter:
        binary = find_vllm_router()
        if binary is None:
            raise RuntimeError("vllm-router is not installed: pip install vllm-router==0.1.17")
        self.port = self.port or free_port()
        cmd = [binary, "--host", "127.0.0.1", "--port", str(self.port),
               "--prometheus-port", str(free_port()), "--policy", self.policy,
               "--worker-urls", *self.worker_urls, *self.extra_args]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm-router exited:\n{self.log_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm-router not healthy after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        _stop_group(self.proc)
        self.proc = None


# vLLM's line when a request's model was resolved by our plugin and loaded: one cold load.
_LOADED = re.compile(r"Resolved and loaded LoRA adapter '([^']+)'")


def cold_loads(log_text: str) -> collections.Counter[str]:
    """How many times each adapter was loaded, from a vLLM replica's log."""
    return collections.Counter(_LOADED.findall(log_text))


def loaded_adapters(url: str, admin_key: str) -> set[str]:
    """The adapters a replica holds loaded, from ``/v1/models`` as an admin (unfiltered)."""
    r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {admin_key}"})
    r.raise_for_status()
    return {card["id"] for card in r.json()["data"] if card.get("parent")}
