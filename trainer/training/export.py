"""The merged-export subprocess: ``python -m trainer.training.export SPEC_JSON``.

A MERGE_EXPORT job's worker, with the training worker's protocol (``trainer.training.worker``):
events on stdout (State, Progress as the bytes are written, then Done with the export's size,
or Failed), library output on stderr, exit 0/1/2. ``trainer.training.merge`` does the work,
one weight at a time (on the job's GPU when it has one), into the spec's ``export_dir``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

from trainer.events import SYSTEM, USER, Done, Failed, Progress, State
from trainer.processes import die_with_parent
from trainer.training.worker import (
    EXIT_OK,
    EXIT_SYSTEM,
    EXIT_USER,
    EventSink,
    system_error_message,
    take_stdout,
)

PROGRESS_EVERY_S = 2.0


def run(spec_file: str, events: EventSink) -> int:
    from trainer.config import JobSpec
    from trainer.errors import DomainError

    with open(spec_file, encoding="utf-8") as f:
        spec = JobSpec.from_dict(json.load(f))
    import torch

    from trainer.training.merge import merge_adapter

    device = "cuda" if torch.cuda.is_available() else "cpu"
    events.emit(State("RUNNING", f"merging into {spec.base_model} on {device}"))
    last = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal last
        if time.monotonic() - last >= PROGRESS_EVERY_S or done == total:
            last = time.monotonic()
            events.emit(Progress(step=done, total_steps=total, epoch=0.0))

    try:
        result = merge_adapter(spec.base_model_path, spec.adapter_path, spec.export_dir,
                               device=device, progress=progress)  # fmt: skip
    except DomainError as e:  # the adapter does not fit this base: the tenant's to know
        events.emit(Failed(USER, str(e)))
        return EXIT_USER
    events.emit(
        Done(
            {
                "size_bytes": result.total_bytes,
                "shards": result.shards,
                "merged_modules": result.merged_modules,
            }
        )
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    die_with_parent()
    events = take_stdout()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a cancel kills the group: die at once
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if len(argv) != 1:
        events.emit(Failed(SYSTEM, "usage: python -m trainer.training.export SPEC_JSON"))
        return EXIT_SYSTEM
    try:
        return run(argv[0], events)
    except BaseException as e:
        traceback.print_exc()
        events.emit(Failed(SYSTEM, system_error_message(e)))
        return EXIT_SYSTEM


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    sys.exit(code)
