"""A job's training curves: TensorBoard event files, the series as JSON, and a PNG plot.

The service records each ``progress`` event of a job as it arrives::

    DATA/jobs/<job_id>/curves/
      events.out.tfevents.<time>.<host>     TensorBoard scalars: train/loss, eval/loss,
                                            train/learning_rate, train/grad_norm,
                                            train/tokens_per_second (``tensorboard --logdir``;
                                            one file per service start, written by tensorboardX)
      metrics.jsonl                         the progress events as received, one a line
      loss.png                              loss and eval loss against the optimizer step
      loss.json                             exactly the series plotted in loss.png

and copies them into the published adapter's folder (vLLM ignores files it does not
know). ``finetune jobs plot`` draws the same plot from ``WatchJob`` events on the client.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tensorboardX.event_file_writer import EventsWriter

log = logging.getLogger(__name__)

CURVES = "curves"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
SERIES_FILE = "loss.json"
EVENTS_PREFIX = "events.out.tfevents."
# Progress field -> TensorBoard tag (the names the Hugging Face Trainer uses).
TAGS = {
    "loss": "train/loss",
    "eval_loss": "eval/loss",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "tokens_per_second": "train/tokens_per_second",
}
# A PNG text chunk carrying the plotted series, so the image says what it shows.
PNG_SERIES_KEY = "finetune:series"


# ---------------------------------------------------------------- series
def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class Series:
    """Per-metric (step, value) points built from progress events, in order.

    A step logged twice (a job resumed from a checkpoint re-logs the steps after it)
    keeps its latest value. ``eval_loss`` is "the latest evaluation", which a progress
    event may repeat after the evaluation step: a point is added only when it changes.
    """

    def __init__(self) -> None:
        self.points: dict[str, dict[int, float]] = {k: {} for k in TAGS}
        self._last_eval: float | None = None

    def add(self, progress: dict[str, Any]) -> dict[str, float]:
        """Take one progress event; return the new points it made, by field."""
        step = int(progress.get("step") or 0)
        new: dict[str, float] = {}
        for key in TAGS:
            raw = progress.get(key)
            if not _finite(raw):
                continue
            value = float(raw)  # type: ignore[arg-type]  # _finite: an int or a float
            if key == "eval_loss":
                if value == self._last_eval:
                    continue
                self._last_eval = value
            self.points[key][step] = value
            new[key] = value
        return new

    @classmethod
    def from_progress(cls, events: Iterable[dict[str, Any]]) -> Series:
        s = cls()
        for p in events:
            s.add(p)
        return s

    def xy(self, key: str) -> tuple[list[int], list[float]]:
        pts = sorted(self.points[key].items())
        return [s for s, _ in pts], [v for _, v in pts]

    def to_json(self) -> dict[str, dict[str, list]]:
        out: dict[str, dict[str, list]] = {}
        for key in TAGS:
            steps, values = self.xy(key)
            if steps:
                out[key] = {"step": steps, "value": values}
        return out


# ---------------------------------------------------------------- the plot
def log_scale(values: list[float]) -> bool:
    """Loss spanning more than two decades (a fast start, a long tail) reads better in log."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 100


def plot(series: Series, path: Path, title: str = "") -> dict[str, Any]:
    """Save loss (and eval loss) against step as a PNG; return the plotted series."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    data = {k: v for k, v in series.to_json().items() if k in ("loss", "eval_loss")}
    fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    styles = {"loss": ("training loss", "#1f77b4", "."), "eval_loss": ("eval loss", "#ff7f0e", "o")}
    for key, (label, color, marker) in styles.items():
        if key in data:
            steps, values = data[key]["step"], data[key]["value"]
            dense = key == "loss" and len(steps) >= 60  # a line is clearer than dots then
            ax.plot(
                steps,
                values,
                label=label,
                color=color,
                linewidth=1.6,
                marker=None if dense else marker,
                markersize=4,
            )
    if not data:
        ax.text(0.5, 0.5, "no loss logged yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if log_scale([v for d in data.values() for v in d["value"]]):
        ax.set_yscale("log")
        ax.set_ylabel("loss (log scale)")
    ax.set_title(title or "training curves", fontsize=11)
    ax.grid(True, alpha=0.3)
    if data:
        ax.legend(frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", metadata={PNG_SERIES_KEY: json.dumps(data)})
    tmp.replace(path)
    return data


def png_series(path: Path) -> dict[str, Any]:
    """The series a PNG made by :func:`plot` says it shows."""
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return json.loads(im.text[PNG_SERIES_KEY])  # type: ignore[attr-defined]


# ---------------------------------------------------------------- one job's curves on disk
class JobCurves:
    """The curves folder of one job: appended to as progress arrives, plotted at the end."""

    def __init__(self, job_dir: Path) -> None:
        self.folder = job_dir / CURVES
        self.series = Series()
        self._events: EventsWriter | None = None
        metrics = self.folder / METRICS_FILE
        if metrics.exists():  # the service restarted mid-job: carry on from what is there
            self.series = Series.from_progress(_read_jsonl(metrics))

    def record(self, progress: dict[str, Any], wall_time: float | None = None) -> None:
        wall_time = time.time() if wall_time is None else wall_time
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": wall_time, **progress}) + "\n")
        new = self.series.add(progress)
        if not new:
            return
        from tensorboardX.event_file_writer import EventsWriter  # not for the CLI's plots
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        if self._events is None:
            # tensorboardX's synchronous writer (SummaryWriter's queues events for a thread):
            # each record is on disk when this returns. One file per start, named by the
            # second and the host, then this suffix: two starts in one second get two files
            # (the writer truncates), in the order TensorBoard reads them.
            prefix = str(self.folder / "events")  # it adds ".out.tfevents.<time>.<host>"
            self._events = EventsWriter(prefix, filename_suffix=f".{time.time_ns()}")
        values = [Summary.Value(tag=TAGS[k], simple_value=v) for k, v in new.items()]
        step = int(progress.get("step") or 0)
        self._events.write_event(
            Event(wall_time=wall_time, step=step, summary=Summary(value=values))
        )
        self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None

    def render(self, title: str = "") -> Path:
        plotted = plot(self.series, self.folder / PLOT_FILE, title)
        (self.folder / SERIES_FILE).write_text(json.dumps(plotted, indent=1))
        return self.folder / PLOT_FILE

    def copy_into(self, dest: Path) -> None:
        """Put the curves beside a trained adapter (top-level files: publishing copies those)."""
        if not self.folder.is_dir():
            return
        for item in self.folder.iterdir():
            if item.is_file() and not item.name.startswith("."):
                shutil.copyfile(item, dest / item.name)


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash
                continue


def finish(job_dir: Path, title: str = "", into: Path | None = None) -> Path | None:
    """Draw the job's plot from its recorded metrics; copy the curves into ``into``.

    Never raises: a plot that cannot be drawn must not fail the job it describes."""
    try:
        curves = JobCurves(job_dir)
        if not (curves.folder / METRICS_FILE).exists():
            return None
        png = curves.render(title)
        if into is not None and into.is_dir():
            curves.copy_into(into)
        return png
    except Exception:
        log.exception("the curves of %s could not be drawn", job_dir.name)
        return None
