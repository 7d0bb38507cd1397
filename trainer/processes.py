"""Child processes: for the demo, the benchmarks and the tests, a free port, a child in its
own process group, waiting until something is up, and stopping it (SIGKILL as a last
resort); for the service's own children, dying with it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when the process that started it dies.

    The service's training and validation subprocesses call it first thing: each runs in
    a session of its own (so that a cancel kills its whole group), so a service killed
    with SIGKILL would otherwise leave them running, holding GPU memory and writing to a
    job the next start resumes or fails. One that starts as its service dies (before this
    call) is killed by the next start, which reaps workers left over (trainer.service.scheduler).
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], T], timeout: float = 180.0, every: float = 0.2) -> T:
    """Call ``pred`` every ``every`` seconds until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def stop(
    proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0, group: bool = False
) -> int:
    """Send ``sig`` (to the whole process group with ``group``), wait ``timeout`` seconds,
    then SIGKILL; return the exit status."""

    def send(s: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:  # even when the leader has exited: its children may not have
                os.killpg(proc.pid, s)
            elif proc.poll() is None:
                proc.send_signal(s)

    send(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        return proc.wait()


@contextlib.contextmanager
def process(cmd: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """A child in its own process group, stopped (whole group) on the way out."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop(proc, group=True)


def wait_ready(
    what: str, ready: Callable[[], object], proc: subprocess.Popen, log: Path, timeout: float
) -> None:
    """Poll ``ready()`` once a second (an exception counts as not yet) while ``proc`` runs;
    exit with a message naming ``log`` if it stops or ``timeout`` passes first."""

    def up() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}; see {log}")
        with contextlib.suppress(Exception):
            return bool(ready())
        return False

    try:
        wait_for(up, timeout, every=1)
    except TimeoutError:
        raise SystemExit(f"{what} did not become ready in {timeout:.0f}s; see {log}") from None
