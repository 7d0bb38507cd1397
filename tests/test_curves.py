"""The curves' file formats and series rules, the console's sparkline, the JSON log lines.

Fast: no service, no training (tests/test_cli.py checks all of it on a real run).
"""

from __future__ import annotations

import io
import json
import logging
import math
import struct

from PIL import Image

from finetune.v1 import trainer_pb2 as pb
from tests.service import tensorboard_scalars
from trainer.cli.console import SPARKS, WatchView, sparkline
from trainer.service import curves
from trainer.service.logs import JsonFormatter


def test_series_keeps_the_latest_value_of_a_step_and_each_evaluation_once():
    s = curves.Series.from_progress(
        [
            {"step": 1, "loss": 3.0, "learning_rate": 1e-3},
            {"step": 2, "loss": 2.0, "grad_norm": float("nan")},
            {"step": 2, "eval_loss": 2.5},  # an evaluation reports eval_loss alone
            {"step": 3, "loss": 1.5, "eval_loss": 2.5},  # the same evaluation, repeated
            {"step": 2, "loss": 1.9},  # resumed from a checkpoint: step 2 logged again
            {"step": 4, "loss": None, "eval_loss": 1.0},
        ]
    )
    assert s.xy("loss") == ([1, 2, 3], [3.0, 1.9, 1.5])
    assert s.xy("eval_loss") == ([2, 4], [2.5, 1.0])
    assert s.xy("grad_norm") == ([], [])  # NaN is not a point
    assert s.to_json()["learning_rate"] == {"step": [1], "value": [1e-3]}


def test_event_files_resume_and_survive_a_torn_record(tmp_path):
    c = curves.JobCurves(tmp_path)
    for step in (1, 2, 3):
        c.record({"step": step, "loss": 1.0 / step, "tokens_per_second": 100.0 * step}, 1e9 + step)
    # The service is killed and restarts: a new JobCurves carries on (its series from
    # metrics.jsonl), in a new event file beside the first.
    c2 = curves.JobCurves(tmp_path)
    c2.record({"step": 4, "loss": 0.2, "eval_loss": 0.3}, 1e9 + 4)
    c2.close()
    files = sorted(c2.folder.glob(curves.EVENTS_PREFIX + "*"))
    assert len(files) == 2
    with open(files[0], "ab") as f:  # a crash mid-write leaves half a record
        f.write(struct.pack("<Q", 50) + b"\0\0\0\0" + b"partial")
    scalars = tensorboard_scalars(c2.folder)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert math.isclose(scalars["train/loss"][1][1], 0.5)
    assert scalars["eval/loss"] == [(4, scalars["eval/loss"][0][1])]
    assert [v for _, v in scalars["train/tokens_per_second"]] == [100.0, 200.0, 300.0]


def test_the_png_says_what_it_plots(tmp_path):
    c = curves.JobCurves(tmp_path)
    for step in range(1, 31):
        c.record(
            {
                "step": step,
                "loss": 5.0 * 0.7**step,
                **({"eval_loss": 0.9**step} if step % 10 == 0 else {}),
            }
        )
    png = curves.finish(tmp_path, "job-x", into=None)
    assert png is not None
    with Image.open(png) as im:
        assert (im.format, im.size) == ("PNG", (800, 450))
    plotted = curves.png_series(png)
    assert plotted == json.loads((c.folder / curves.SERIES_FILE).read_text())
    assert plotted["loss"]["step"] == list(range(1, 31))
    assert plotted["eval_loss"]["step"] == [10, 20, 30]
    assert curves.log_scale(plotted["loss"]["value"])  # 5.0 down to 1e-4: three decades
    # Nothing recorded: no plot.
    assert curves.finish(tmp_path / "other") is None


def test_a_plot_that_cannot_be_drawn_does_not_raise(tmp_path, caplog):
    c = curves.JobCurves(tmp_path)
    c.record({"step": 1, "loss": 1.0})
    (c.folder / curves.PLOT_FILE).mkdir()  # the PNG's place is taken: the write fails
    assert curves.finish(tmp_path, "job-x") is None
    assert "could not be drawn" in caplog.text


def test_sparkline():
    assert sparkline([]) == ""
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == SPARKS
    assert sparkline([2.0, 2.0]) == SPARKS[3] * 2
    assert len(sparkline(list(range(100)), width=24)) == 24
    # A loss falling over decades: a log scale keeps the tail readable.
    decay = [10 * 0.5**i for i in range(16)]
    assert sparkline(decay) == "".join(sorted(sparkline(decay), reverse=True))
    assert len(set(sparkline(decay))) == 8


def test_json_log_lines_carry_the_extra_fields():
    record = logging.LogRecord(
        "trainer.service.jobs", logging.INFO, __file__, 1, "job %s %s", ("j", "RUNNING"), None
    )
    record.job_id, record.tenant, record.state = "job-1", "acme", "RUNNING"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "job j RUNNING"
    assert (line["job_id"], line["tenant"], line["state"]) == ("job-1", "acme", "RUNNING")
    assert line["level"] == "INFO" and line["time"].endswith("Z")


def _progress_event(step: int, total: int, **fields: float) -> pb.JobEvent:
    ev = pb.JobEvent(job_id="job-1", state=pb.JOB_STATE_RUNNING, message="progress")
    ev.progress.step, ev.progress.total_steps = step, total
    for k, v in fields.items():
        setattr(ev.progress, k, v)
    return ev


def test_watch_view_in_a_log_prints_a_line_per_percent_and_per_evaluation():
    out = io.StringIO()
    view = WatchView(out, tty=False)
    view.event(pb.JobEvent(job_id="job-1", state=pb.JOB_STATE_RUNNING, message="loading"))
    for step in range(1, 1001):
        extra = {"eval_loss": 1.0 / step} if step % 250 == 0 else {}
        view.event(_progress_event(step, 1000, loss=10.0 / step, eta_seconds=1000 - step, **extra))
    view.close()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("RUNNING    loading")
    progress = [x for x in lines if x.startswith("step ")]
    assert 100 <= len(progress) <= 105
    assert progress[-1].startswith("step 1000/1000 ████████████████████ 100%")
    assert "eval 0.0010" in progress[-1] and "ETA 0:00" in progress[-1]


def test_watch_view_on_a_terminal_redraws_one_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    out = io.StringIO()
    view = WatchView(out, tty=True)
    for step in range(1, 4):
        view.event(_progress_event(step, 3, loss=1.0 / step, tokens_per_second=1234.0))
    view.event(pb.JobEvent(job_id="job-1", state=pb.JOB_STATE_SUCCEEDED, message="published"))
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 3 and text.count("\n") == 2  # ended, then the state line
    redraws = text.split("\n")[0].split("\r\x1b[K")[1:]
    assert all(len(r) <= 59 for r in redraws)
    assert redraws[-1].startswith("step 3/3")
