"""The worker protocol: typed events, one JSON line each, read back as they were written."""

from __future__ import annotations

import json
import math

from trainer.events import (
    SYSTEM,
    Checkpoint,
    DatasetReport,
    Done,
    Failed,
    Progress,
    State,
    decode,
    encode,
)


def test_every_event_comes_back_as_it_was_written() -> None:
    sent = [
        State("RUNNING", "loading"),
        Progress(step=3, total_steps=10, epoch=0.3, loss=1.5, tokens_per_second=99.0),
        DatasetReport({"examples": 12, "findings": []}),
        Checkpoint(4, "/data/jobs/j/checkpoints/checkpoint-4"),
        Done({"train_loss": 0.1}),
        Failed(SYSTEM, "out of memory"),
    ]
    assert [decode(encode(ev) + "\n") for ev in sent] == sent


def test_what_json_cannot_hold_and_what_this_version_does_not_know() -> None:
    line = encode(Progress(step=1, total_steps=2, epoch=0.5, loss=math.nan, grad_norm=math.inf))
    assert json.loads(line)["loss"] is None  # NaN is not JSON
    assert decode(line) == Progress(step=1, total_steps=2, epoch=0.5)
    assert Progress(step=1, total_steps=2, epoch=0.5, loss=2.0).figures() == {
        "step": 1, "total_steps": 2, "epoch": 0.5, "loss": 2.0
    }  # fmt: skip
    # A newer worker: an unknown field is left out, an unknown kind skipped.
    newer = {"event": "progress", "step": 1, "total_steps": 2, "epoch": 0.5, "mfu": 0.4}
    assert decode(json.dumps(newer)) == Progress(step=1, total_steps=2, epoch=0.5)
    assert decode('{"event": "telemetry", "x": 1}') is None
    # Library output on the stream, a torn line, an event missing a field it needs.
    for junk in ("Loading checkpoint shards: 100%", '{"event": "state"', '{"event": "done"}'):
        assert decode(junk) is None
