"""The training subprocess: ``python -m trainer.worker SPEC_JSON``.

The scheduler starts one per job, in its own process group, and reads its stdout.

Protocol
    stdout  events only, one JSON object per line, flushed after each:
              {"event": "state", "state": "VALIDATING" | "RUNNING", "message": str}
              {"event": "progress", "step": int, "total_steps": int, "epoch": float,
               "loss": float | null, "learning_rate": float | null,
               "tokens_per_second": float | null, "eta_seconds": float | null,
               "peak_memory_bytes": int | null}
              {"event": "checkpoint", "step": int, "path": str}
              {"event": "done", "metrics": {...}}
              {"event": "error", "kind": "user" | "system", "message": str}
            Non-finite numbers are sent as null.
    stderr  library output and tracebacks (the scheduler keeps it as the job's log).
    exit    0: the adapter is in ``spec.output_dir`` (after "done");
            2: the customer's input is wrong (after an "error" event of kind "user");
            1: anything else (after an "error" event of kind "system", when it could
               still write one); SIGTERM/SIGKILL: killed, no event.

Before torch or transformers are imported, fd 1 is duplicated for the events and then
pointed at fd 2, so nothing a library prints can corrupt the event stream.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import traceback
from typing import Any, TextIO

from trainer.processes import die_with_parent

EXIT_OK = 0
EXIT_SYSTEM = 1
EXIT_USER = 2


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: send them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class EventSink:
    """Writes events as JSON lines to the stream the scheduler reads."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **_json_safe(fields)}, default=str)
        self.stream.write(line + "\n")
        self.stream.flush()


def take_stdout() -> EventSink:
    """Keep the original stdout for events; send everything else written to fd 1 to stderr."""
    sys.stdout.flush()
    events_fd = os.dup(1)  # not inheritable: child processes cannot write events
    os.dup2(2, 1)
    return EventSink(os.fdopen(events_fd, "w", encoding="utf-8", buffering=1))


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def system_error_message(exc: BaseException) -> str:
    if _is_out_of_memory(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (
            f"out of memory: {first}. Try a smaller batch_size or max_seq_len "
            "(raise gradient_accumulation_steps to keep the effective batch size)."
        )
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    events = take_stdout()
    # The scheduler cancels by killing the process group: die at once, hold nothing.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    try:
        if len(argv) != 1:
            raise SystemExit("usage: python -m trainer.worker SPEC_JSON")
        from trainer.config import JobSpec
        from trainer.errors import FailedPrecondition, InvalidArgument

        with open(argv[0], encoding="utf-8") as f:
            raw = json.load(f)
        try:
            spec = JobSpec.from_dict(raw)
        except InvalidArgument as e:
            events.emit("error", kind="user", message=str(e))
            return EXIT_USER
        from trainer.recipe import UserError, run  # torch, transformers, TRL from here on
    except BaseException as e:
        traceback.print_exc()
        events.emit("error", kind="system", message=system_error_message(e))
        return EXIT_SYSTEM

    try:
        metrics = run(spec, events)
    except UserError as e:
        events.emit("error", kind="user", message=str(e))
        return EXIT_USER
    except FailedPrecondition as e:  # the operator's to repair (a base model's files): said plainly
        traceback.print_exc()
        events.emit("error", kind="system", message=str(e))
        return EXIT_SYSTEM
    except BaseException as e:
        traceback.print_exc()
        events.emit("error", kind="system", message=system_error_message(e))
        return EXIT_SYSTEM
    events.emit("done", metrics=metrics)
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    sys.exit(code)
