"""``server.orphans``: a process vLLM starts dies when its parent is SIGKILLed (fast, no vLLM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.server.conftest import ROOT

# The parent installs the hook (as our plugin does in the API server), then forks one
# child and spawns another through multiprocessing (as vLLM starts its engine).
PARENT = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from server import orphans

    def engine():
        orphans.install()  # what the plugin does in a spawned process
        time.sleep(120)

    if __name__ == "__main__":
        orphans.POLL_S = 0.05
        orphans.install()
        forked = os.fork()
        if forked == 0:
            time.sleep(120)
            os._exit(0)
        spawned = multiprocessing.get_context("spawn").Process(target=engine)
        spawned.start()
        print(forked, spawned.pid, flush=True)
        time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_children_die_with_a_sigkilled_parent(tmp_path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen(
        [sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env
    )
    assert parent.stdout is not None
    children = [int(p) for p in parent.stdout.readline().split()]
    try:
        assert len(children) == 2 and all(_alive(p) for p in children)
        time.sleep(1.0)
        assert all(_alive(p) for p in children)  # a living parent: they stay
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in children):
            time.sleep(0.1)
        assert not any(_alive(p) for p in children)
    finally:
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
