"""vLLM's engine processes die with the API server that started them, even after a SIGKILL.

vLLM 0.32's API server starts an ``EngineCore`` process (which starts its ``Worker``). On
a clean stop it stops them; killed outright (SIGKILL, a crash, the OOM killer) it cannot,
and the engine process is not told: it stays, holding the model and its KV cache (on a
GPU, the memory the next vLLM needs), for ever. Found by
``tests/server/test_server_reliability.py``.

``install()`` runs from our plugin: every process vLLM starts asks the kernel for SIGKILL
when its parent dies (``PR_SET_PDEATHSIG``), so a killed API server takes its engine
with it, and that engine its worker. Forked children get it from an at-fork hook, spawned
ones when they load the plugin.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

log = logging.getLogger("vllm.finetune.orphans")

PR_SET_PDEATHSIG = 1
_hooked = False


def die_with_parent(parent_pid: int) -> bool:
    """Be SIGKILLed when ``parent_pid`` (this process's parent) exits."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def _after_fork_in_child() -> None:
    die_with_parent(os.getppid())


def install() -> None:
    global _hooked
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:  # a spawned engine or worker process
        die_with_parent(parent.pid)
    if not _hooked:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _hooked = True
