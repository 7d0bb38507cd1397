"""The training subprocess: ``python -m trainer.training.worker SPEC_JSON``.

The scheduler starts one per job, in its own process group, and reads its stdout.

Protocol
    stdout  events only (``trainer.events``), one JSON object a line, flushed after each:
            State, Progress, DatasetReport and Checkpoint as the job goes, then Done, or
            Failed (kind user or system).
    stderr  library output and tracebacks (the scheduler keeps it as the job's log).
    exit    0: the adapter is in ``spec.folder.output`` (after Done);
            2: the customer's input is wrong (after a Failed of kind user);
            1: anything else (after a Failed of kind system, when it could still write
               one); SIGTERM/SIGKILL: killed, no event.

Before torch or transformers are imported, fd 1 is duplicated for the events and then
pointed at fd 2, so nothing a library prints can corrupt the event stream.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from typing import TextIO

from trainer.events import SYSTEM, USER, Done, Event, Failed, encode
from trainer.processes import die_with_parent

EXIT_OK = 0
EXIT_SYSTEM = 1
EXIT_USER = 2


class EventSink:
    """Writes events as JSON lines to the stream the scheduler reads."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def emit(self, event: Event) -> None:
        self.stream.write(encode(event) + "\n")
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
            raise SystemExit("usage: python -m trainer.training.worker SPEC_JSON")
        from trainer.config import JobSpec
        from trainer.errors import FailedPrecondition, InvalidArgument

        with open(argv[0], encoding="utf-8") as f:
            raw = json.load(f)
        try:
            spec = JobSpec.from_dict(raw)
        except InvalidArgument as e:
            events.emit(Failed(USER, str(e)))
            return EXIT_USER
        from trainer.training.recipe import UserError, run  # torch, transformers, TRL from here on
    except BaseException as e:
        traceback.print_exc()
        events.emit(Failed(SYSTEM, system_error_message(e)))
        return EXIT_SYSTEM

    try:
        metrics = run(spec, events)
    except UserError as e:
        events.emit(Failed(USER, str(e)))
        return EXIT_USER
    except FailedPrecondition as e:  # the operator's to repair (a base model's files): said plainly
        traceback.print_exc()
        events.emit(Failed(SYSTEM, str(e)))
        return EXIT_SYSTEM
    except BaseException as e:
        traceback.print_exc()
        events.emit(Failed(SYSTEM, system_error_message(e)))
        return EXIT_SYSTEM
    events.emit(Done(metrics))
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    sys.exit(code)
