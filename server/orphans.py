"""vLLM's engine processes die with the API server that started them, even after a SIGKILL.

vLLM 0.32's API server starts an ``EngineCore`` process (which starts its ``Worker``). On
a clean stop it stops them; killed outright (SIGKILL, a crash, the OOM killer) it cannot,
and the engine process is not told: it stays, holding the model and its KV cache (on a
GPU, the memory the next vLLM needs), for ever. Found by
``tests/server/test_server_reliability.py``.

``install()`` runs from our plugin: every process vLLM starts watches its parent and
SIGKILLs itself once the parent is gone (it is then re-parented), so a killed API server
takes its engine with it, and that engine its worker. A watching thread rather than
``PR_SET_PDEATHSIG``: the latter fires when the parent *thread* that started the child
ends, which in a threaded server may be long before the parent process does. Forked
children start the watch from an at-fork hook, spawned ones when they load the plugin.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

log = logging.getLogger("vllm.finetune.orphans")

POLL_S = 0.5
_hooked = False


def die_with_parent(parent_pid: int, poll_s: float = POLL_S) -> threading.Thread:
    """Watch ``parent_pid`` (this process's parent) and SIGKILL this process when it is gone."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        log.error("parent process %d is gone; exiting", parent_pid)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="finetune-parent-watch", daemon=True)
    thread.start()
    return thread


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
