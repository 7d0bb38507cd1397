"""What the command line prints for people: tables, durations, a sparkline, live job progress.

Machine output (``--json``) does not come through here; ``trainer.cli.main`` prints
protobuf messages as JSON itself.
"""

from __future__ import annotations

import math
import shutil
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any, TextIO

from finetune.v1 import trainer_pb2 as pb

SPARKS = "▁▂▃▄▅▆▇█"


def state_name(state: int) -> str:
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")


def sparkline(values: Sequence[float], width: int = 24) -> str:
    """Values as block characters, lowest to highest; bucket means past ``width`` values.

    Values spanning more than two decades are drawn on a log scale, as a loss usually is."""
    if not values:
        return ""
    if len(values) > width:
        n = len(values)
        buckets = [values[i * n // width : (i + 1) * n // width] for i in range(width)]
        values = [sum(b) / len(b) for b in buckets if b]
    if min(values) > 0 and max(values) / min(values) > 100:  # a loss's long tail: log scale
        values = [math.log(v) for v in values]
    lo, hi = min(values), max(values)
    span = hi - lo
    top = len(SPARKS) - 1
    return "".join(SPARKS[round((v - lo) / span * top) if span else top // 2] for v in values)


def duration(seconds: float | None) -> str:
    """0:42, 12:05, 3:02:10."""
    if seconds is None or seconds < 0:
        return "-"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def age(ts: Any, now: float | None = None) -> str:
    """How long ago a protobuf Timestamp was: 5s, 3m, 2h, 4d."""
    if ts is None or not ts.seconds:
        return "-"
    d = max(0.0, (now or time.time()) - ts.seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= size:
            return f"{int(d // size)}{unit}"
    return f"{int(d)}s"


def si(n: float, unit: str = "") -> str:
    """1234 -> 1.2k; 5.3e6 -> 5.3M."""
    for suffix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}" if n == int(n) or abs(n) >= 10 else f"{n:.1f}{unit}"


def size(n: int) -> str:
    for suffix, step in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= step:
            return f"{n / step:.1f} {suffix}"
    return f"{n} B"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str = "") -> str:
    """Left-aligned columns, two spaces apart; ``empty`` when there are no rows."""
    if not rows:
        return empty
    cells = [[str(c) for c in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def fmt_loss(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


# ---------------------------------------------------------------- listings
def jobs_table(jobs: Sequence[pb.Job]) -> str:
    rows = []
    for j in jobs:
        p = j.progress
        step = f"{p.step}/{p.total_steps}" if p.total_steps else "-"
        rows.append(
            (
                j.id,
                j.adapter_name,
                j.base_model,
                state_name(j.state),
                step,
                fmt_loss(p.loss if p.HasField("loss") else None),
                fmt_loss(p.eval_loss if p.HasField("eval_loss") else None),
                age(j.created_at),
            )
        )
    headers = ("JOB", "ADAPTER", "BASE", "STATE", "STEP", "LOSS", "EVAL", "AGE")
    return table(headers, rows, empty="no jobs")


def datasets_table(items: Sequence[pb.Dataset]) -> str:
    rows = [
        (
            d.id,
            d.name,
            pb.DatasetFormat.Name(d.format).removeprefix("DATASET_FORMAT_").lower(),
            d.num_rows,
            size(d.size_bytes),
            age(d.created_at),
        )
        for d in items
    ]
    return table(("DATASET", "NAME", "FORMAT", "ROWS", "SIZE", "AGE"), rows, empty="no datasets")


def adapters_table(items: Sequence[pb.Adapter]) -> str:
    rows = [
        (
            a.served_name,
            a.version + (" (pinned)" if a.pinned else ""),
            a.newest_version,
            a.version_count,
            a.base_model,
            a.job_id,
            age(a.created_at),
        )
        for a in items
    ]
    return table(
        ("ADAPTER", "SERVED", "NEWEST", "VERSIONS", "BASE", "JOB", "AGE"), rows, empty="no adapters"
    )


def versions_table(items: Sequence[pb.AdapterVersion]) -> str:
    rows = [
        (
            v.version + (" *" if v.served else ""),
            v.job_id,
            v.dataset_id or v.dataset_sha256[:12],
            fmt_loss(v.eval_loss if v.HasField("eval_loss") else None),
            fmt_loss(v.train_loss if v.HasField("train_loss") else None),
            v.hyperparameters.lora_rank,
            size(v.size_bytes),
            age(v.created_at),
        )
        for v in items
    ]
    return table(
        ("VERSION", "JOB", "DATASET", "EVAL LOSS", "TRAIN LOSS", "RANK", "SIZE", "AGE"),
        rows,
        empty="no versions",
    ) + ("\n* served under the adapter's name" if rows else "")


def usage_table(u: pb.Usage) -> str:
    def limit(n: int, fmt: Any = str) -> str:
        return fmt(n) if n else "none"

    jobs = ", ".join(f"{k.lower()} {v}" for k, v in sorted(u.jobs_by_state.items())) or "none"
    rows = [
        ("tenant", u.tenant),
        ("tokens trained", f"{u.tokens_trained:,}"),
        ("device time", f"{u.gpu_seconds / 3600:.2f} h ({u.gpu_seconds:.0f} s)"),
        ("jobs", jobs),
        ("datasets", size(u.dataset_bytes)),
        ("adapters", size(u.adapter_bytes)),
        ("exports", size(u.export_bytes)),
        ("stored", f"{size(u.stored_bytes)} of {limit(u.max_stored_bytes, size)}"),
        ("unfinished jobs allowed", limit(u.max_queued_jobs)),
    ]
    return table(("USAGE", ""), rows)


def job_details(j: pb.Job) -> str:
    hp = j.hyperparameters
    p = j.progress
    lines = [
        f"job        {j.id}",
        f"state      {state_name(j.state)}",
        f"adapter    {j.adapter_name}"
        + (f"  (served as {j.served_name})" if j.served_name else ""),
        f"base       {j.base_model}",
        f"dataset    {j.dataset_id}"
        + (f"  eval: {j.validation_dataset_id}" if j.validation_dataset_id else "")
        + (f"  eval fraction {j.eval_fraction:g}" if j.eval_fraction else ""),
    ]
    if p.total_steps:
        lines.append(
            f"progress   step {p.step}/{p.total_steps}, epoch {p.epoch:.2f}"
            + (f", loss {p.loss:.4f}" if p.HasField("loss") else "")
            + (f", eval loss {p.eval_loss:.4f}" if p.HasField("eval_loss") else "")
            + (f", peak memory {size(p.peak_memory_bytes)}" if p.peak_memory_bytes else "")
        )
    if j.adapter_version:
        lines.append(f"version    {j.adapter_version}")
    if j.error_message:
        kind = pb.ErrorKind.Name(j.error_kind).removeprefix("ERROR_KIND_").lower()
        lines.append(f"error      ({kind}) {j.error_message}")
    fields = [
        f"{f.name}={getattr(hp, f.name)}"
        for f in hp.DESCRIPTOR.fields
        if f.name != "target_modules" and hp.HasField(f.name)
    ]
    if hp.target_modules:
        fields.append("target_modules=" + ",".join(hp.target_modules))
    if fields:
        wrapped = textwrap.wrap(" ".join(fields), 88, break_on_hyphens=False)
        lines.append("settings   " + wrapped[0])
        lines.extend("           " + w for w in wrapped[1:])
    return "\n".join(lines)


# ---------------------------------------------------------------- live progress
class WatchView:
    """Renders a job's events: one line per state change, a live progress line between.

    On a terminal the progress line is redrawn in place; elsewhere (a pipe, a log file)
    progress is a line per 1% of the steps and per evaluation.
    """

    def __init__(self, out: TextIO = sys.stdout, tty: bool | None = None, width: int = 24) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.width = width
        self.latest: dict[str, float] = {}
        self.losses: dict[int, float] = {}
        self.step = self.total = 0
        self._live = False
        self._printed = -1

    def event(self, ev: pb.JobEvent) -> None:
        if ev.HasField("progress") and (ev.progress.total_steps or ev.progress.step):
            self._progress(ev.progress)
            return
        self._end_live()
        when = time.strftime("%H:%M:%S", time.localtime(ev.time.seconds or time.time()))
        self.out.write(f"{when}  {state_name(ev.state):<10} {ev.message}\n")
        self.out.flush()

    def _progress(self, p: pb.Progress) -> None:
        self.step, self.total = p.step, p.total_steps or self.total
        for f in ("loss", "eval_loss", "learning_rate", "tokens_per_second", "eta_seconds"):
            if p.HasField(f):
                self.latest[f] = getattr(p, f)
        if p.HasField("loss"):
            self.losses[p.step] = p.loss
        line = self.line()
        if self.tty:
            columns = shutil.get_terminal_size().columns
            self.out.write("\r\x1b[K" + line[: columns - 1])  # a wrapped line cannot be redrawn
            self._live = True
        else:
            # In a log, a line per 1% of the steps, per evaluation, and the last one.
            evaluated = p.HasField("eval_loss")
            every = max(1, self.total // 100)
            if evaluated or self.step >= self.total or self.step - self._printed >= every:
                self.out.write(line + "\n")
                self._printed = self.step
        self.out.flush()

    def line(self) -> str:
        total = self.total or 0
        frac = self.step / total if total else 0.0
        filled = round(frac * 20)
        bar = "█" * filled + "░" * (20 - filled)
        get = self.latest.get
        parts = [f"step {self.step}/{total or '?'} {bar} {frac:4.0%}"]
        parts.append(f"loss {fmt_loss(get('loss'))}")
        spark = sparkline([v for _, v in sorted(self.losses.items())], self.width)
        if spark:
            parts.append(spark)
        if "eval_loss" in self.latest:
            parts.append(f"eval {fmt_loss(get('eval_loss'))}")
        tps = get("tokens_per_second")
        parts.append(f"{si(tps)} tok/s" if tps is not None else "- tok/s")
        parts.append(f"ETA {duration(get('eta_seconds'))}")
        return "  ".join(parts)

    def _end_live(self) -> None:
        if self._live:
            self.out.write("\n")
            self._live = False

    def close(self) -> None:
        self._end_live()
        self.out.flush()
