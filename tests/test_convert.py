"""Protobuf <-> domain conversion: every field survives the round trip."""

from __future__ import annotations

from dataclasses import fields

from trainer.convert import dataset_report, report_of
from trainer.report import Finding, Report


def test_dataset_report_round_trip_keeps_every_field():
    # A distinct, non-default value in every field, so a field the conversion drops (or
    # swaps with another) shows up as a difference.
    values = {f.name: i + 1 for i, f in enumerate(fields(Report)) if f.name != "findings"}
    values |= {"format": "alpaca", "tokens_mean": 7.5, "loss_token_share": 0.25}
    findings = [
        Finding("error", "no_eos_in_labels", "no EOS", 3, [1, 4, 9]),
        Finding("warning", "truncated", "cut", 1, [2]),
    ]
    report = Report(**values, findings=findings)
    msg = dataset_report(report.to_dict())
    assert msg is not None and msg.ok is False
    assert report_of(msg) == report
