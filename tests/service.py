"""The real trainer service and its training worker as processes, for tests (no mocks),
and the small jobs the tests train."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from trainer.cli.client import TrainerClient
from trainer.config import JobConfig, JobSpec
from trainer.dev.demo import HYPERPARAMETERS
from trainer.processes import stop

ROOT = Path(__file__).resolve().parents[1]
# The demo's small job (rank 8, batch 8, 64 tokens), one epoch: enough to run the job
# through, not to teach the answer.
QUICK = {**HYPERPARAMETERS, "num_epochs": 1}
# make_spec's job. On 64 identical examples, batch 4 is 16 steps an epoch; with the tiny
# model's wide lm_head the loss is ~0.005 after one epoch; three make the bf16-base answer
# robust (p > 0.99).
TRAIN = dict(
    lora_rank=16,
    lora_dropout=0.0,
    learning_rate=2e-3,
    warmup_steps=0,
    batch_size=4,
    gradient_accumulation_steps=1,
    max_seq_len=128,
    num_epochs=3,
    seed=0,
)


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
        return stop(self.proc, sig, timeout)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
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


def process_pids(*needles: bytes) -> list[int]:
    """The live (not zombie) processes on this machine whose command line holds every needle."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if all(n in cmd for n in needles) and ") Z" not in stat:
            pids.append(int(d.name))
    return pids


def worker_pids(job_id: str) -> list[int]:
    """The live training subprocesses of job ``job_id``."""
    return process_pids(b"trainer.training.worker", job_id.encode())


def make_spec(
    tmp: Path, model_dir: Path, dataset: Path, spec: dict[str, Any] | None = None, **overrides
) -> Path:
    """A worker's spec file in ``tmp``: ``TRAIN`` with ``overrides`` on ``dataset`` (and
    ``spec``'s fields of ``JobSpec`` itself)."""
    job = JobSpec(
        job_id="job-1",
        base_model="tiny",
        base_model_path=str(model_dir),
        dataset_path=str(dataset),
        job_dir=str(tmp),
        config=JobConfig(**{**TRAIN, **overrides}),
        **(spec or {}),
    )
    path = tmp / "spec.json"
    path.write_text(json.dumps(job.to_dict()))
    return path


def start_worker(spec: Path, log: Path) -> subprocess.Popen[str]:
    """The worker in its own process group, as the scheduler starts it."""
    with open(log, "ab") as stderr:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "trainer.training.worker", str(spec)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )


def run_worker(spec: Path, log: Path, timeout: float = 300) -> tuple[int, list[dict]]:
    """Run the worker to its end; its exit status and its events (every stdout line)."""
    proc = start_worker(spec, log)
    out, _ = proc.communicate(timeout=timeout)
    # Every stdout line must be an event: library prints went to stderr.
    return proc.returncode, [json.loads(line) for line in out.splitlines()]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of the event files in ``folder``, read by TensorBoard's
    own loader (not by the code that wrote them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
