"""What a job's subprocess tells the service: typed events, one JSON object a line.

The training worker (``trainer.training.worker``) and the validation run
(``trainer.data.report``) write them to their event stream; ``trainer.service.runner`` reads
them back as these classes, and the scheduler and ``Jobs`` act on them by type. A new
progress figure is a field of ``Progress``, set by the recipe, and (to reach clients) a field
of the proto's ``Progress`` message of the same name: nothing in between names it.

On the wire: ``{"event": KIND, **fields}``; NaN and infinities are sent as null (JSON has
neither); a line that is not an event, or of a kind this version does not know, is skipped,
and fields it does not know are left out, so either side may be newer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar


@dataclass(frozen=True)
class State:
    """The job moved on: VALIDATING (checking its input) or RUNNING (training)."""

    KIND: ClassVar[str] = "state"
    state: str
    message: str


@dataclass(frozen=True)
class Progress:
    """Training progress, at each logged optimizer step and each evaluation (which reports
    ``eval_loss`` alone). Unset figures are None."""

    KIND: ClassVar[str] = "progress"
    step: int
    total_steps: int
    epoch: float
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    peak_memory_bytes: int | None = None
    eval_loss: float | None = None

    def figures(self) -> dict[str, Any]:
        """The figures that are set, by name (as the job store and the proto keep them)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class DatasetReport:
    """The dataset report (``trainer.data.report.Report.to_dict()``): the job's, or the answer
    of a validation run."""

    KIND: ClassVar[str] = "report"
    report: dict[str, Any]


@dataclass(frozen=True)
class Checkpoint:
    """A whole checkpoint was written."""

    KIND: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class Done:
    """Training finished; the adapter is in the spec's ``folder.output``."""

    KIND: ClassVar[str] = "done"
    metrics: dict[str, Any]


USER, SYSTEM, PRECONDITION = "user", "system", "precondition"


@dataclass(frozen=True)
class Failed:
    """The run failed: the customer's input (``user``), the base model's files
    (``precondition``: the operator's to repair), or anything else (``system``)."""

    KIND: ClassVar[str] = "error"
    kind: str
    message: str


Event = State | Progress | DatasetReport | Checkpoint | Done | Failed
_BY_KIND: dict[str, type[Event]] = {
    cls.KIND: cls for cls in (State, Progress, DatasetReport, Checkpoint, Done, Failed)
}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def encode(event: Event) -> str:
    """One line (without its newline)."""
    return json.dumps({"event": event.KIND, **_finite(asdict(event))}, default=str)


def decode(line: str | bytes) -> Event | None:
    """The event on ``line``, or None for anything else (library output, a newer kind)."""
    try:
        raw = json.loads(line)
        cls = _BY_KIND[raw.pop("event")]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    known = {f.name for f in fields(cls)}
    try:
        return cls(**{k: v for k, v in raw.items() if k in known})
    except TypeError:  # a field this version needs is missing
        return None
