"""A job's training curves: TensorBoard event files, the series as JSON, and a PNG plot.

The service records each ``progress`` event of a job as it arrives::

    DATA/jobs/<job_id>/curves/
      events.out.tfevents.<time>.finetune   TensorBoard scalars: train/loss, eval/loss,
                                            train/learning_rate, train/grad_norm,
                                            train/tokens_per_second (``tensorboard --logdir``)
      metrics.jsonl                         the progress events as received, one a line
      loss.png                              loss and eval loss against the optimizer step
      loss.json                             exactly the series plotted in loss.png

and copies them into the published adapter's folder (vLLM ignores files it does not
know). ``finetune jobs plot`` draws the same plot from ``WatchJob`` events on the client.

The event files are written here, with no TensorBoard or TensorFlow dependency: a
TFRecord of ``Event`` protos (``file_version`` first, then one ``Summary`` of
``simple_value`` scalars per step), framed by masked CRC-32C checksums.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- TFRecord framing
def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def read_records(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord file, checksums verified (a torn last record is skipped)."""
    with open(path, "rb") as f:
        while header := f.read(8):
            if len(header) < 8:
                return
            (n,) = struct.unpack("<Q", header)
            (hcrc,) = struct.unpack("<I", f.read(4) or b"\0\0\0\0")
            data = f.read(n)
            tail = f.read(4)
            if len(data) < n or len(tail) < 4:
                return
            if hcrc != _masked_crc(header) or struct.unpack("<I", tail)[0] != _masked_crc(data):
                raise ValueError(f"{path}: corrupt record")
            yield data


# ---------------------------------------------------------------- Event protos, by hand
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2) + _varint(len(data)) + data


def encode_event(
    wall_time: float, step: int = 0, *, scalars: dict[str, float] | None = None, version: str = ""
) -> bytes:
    """``tensorboard.Event``: wall_time=1 (double), step=2, file_version=3, summary=5."""
    out = _field(1, 1) + struct.pack("<d", wall_time)
    if step:
        out += _field(2, 0) + _varint(step)
    if version:
        out += _bytes_field(3, version.encode())
    if scalars:
        # Summary.value=1 -> Value{tag=1, simple_value=2 (float)}
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", v))
            for tag, v in scalars.items()
        )
        out += _bytes_field(5, summary)
    return out


def _parse(data: bytes) -> Iterator[tuple[int, int, Any]]:
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(data, i)
            value, i = data[i : i + n], i + n
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def decode_event(data: bytes) -> dict[str, Any]:
    """The fields of an ``Event`` this module writes: wall_time, step, file_version, scalars."""
    ev: dict[str, Any] = {"wall_time": 0.0, "step": 0, "scalars": {}}
    for number, _, value in _parse(data):
        if number == 1:
            ev["wall_time"] = struct.unpack("<d", value)[0]
        elif number == 2:
            ev["step"] = value
        elif number == 3:
            ev["file_version"] = value.decode()
        elif number == 5:
            for vn, _, v in _parse(value):
                if vn != 1:
                    continue
                fields = {n: x for n, _, x in _parse(v)}
                ev["scalars"][fields[1].decode()] = struct.unpack("<f", fields[2])[0]
    return ev


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files of ``folder``: tag -> [(step, value), ...]."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob(EVENTS_PREFIX + "*")):
        for rec in read_records(path):
            ev = decode_event(rec)
            for tag, value in ev["scalars"].items():
                out.setdefault(tag, []).append((ev["step"], value))
    return out


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
        self._events: Path | None = None
        metrics = self.folder / METRICS_FILE
        if metrics.exists():  # the service restarted mid-job: carry on from what is there
            self.series = Series.from_progress(_read_jsonl(metrics))
            self._events = next(iter(sorted(self.folder.glob(EVENTS_PREFIX + "*"))), None)

    def record(self, progress: dict[str, Any], wall_time: float | None = None) -> None:
        wall_time = time.time() if wall_time is None else wall_time
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": wall_time, **progress}) + "\n")
        new = self.series.add(progress)
        if self._events is None:
            self._events = self.folder / f"{EVENTS_PREFIX}{int(wall_time)}.finetune"
            with open(self._events, "ab") as f:
                f.write(_record(encode_event(wall_time, version="brain.Event:2")))
        if new:
            scalars = {TAGS[k]: v for k, v in new.items()}
            step = int(progress.get("step") or 0)
            with open(self._events, "ab") as f:
                f.write(_record(encode_event(wall_time, step, scalars=scalars)))

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
