"""Starting the real trainer service as a process, for tests (no mocks)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from trainer.client import TrainerClient

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, data_dir: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``python -m trainer ...`` and return the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args, "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
    )


def add_tenant(data_dir: Path, name: str, admin: bool = False) -> str:
    out = cli("tenant", "add", name, *(["--admin"] if admin else []), data_dir=data_dir)
    return out.stdout.strip()


@dataclass
class Service:
    """A running ``python -m trainer serve`` process."""

    data_dir: Path
    base_models: dict[str, str]
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[str] | None = None
    addr: str = ""
    log_path: Path | None = None

    def start(self, timeout: float = 60.0) -> Service:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "trainer",
            "serve",
            "--data-dir",
            str(self.data_dir),
            "--listen",
            "127.0.0.1:0",
            *self.extra,
        ]
        for name, path in self.base_models.items():
            cmd += ["--base-model", f"{name}={path}"]
        self.log_path = self.data_dir / "service.log"
        log = open(self.log_path, "a")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = re.search(r"trainer listening on (\S+)", line)
            if m:
                self.addr = m.group(1)
                grpc.channel_ready_future(grpc.insecure_channel(self.addr)).result(timeout=30)
                return self
        raise RuntimeError(f"service did not start: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def client(self, key: str, tenant: str | None = None) -> TrainerClient:
        return TrainerClient(self.addr, key, tenant=tenant)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_rows(question: str, answer: str, n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        }
        for _ in range(n)
    ]
