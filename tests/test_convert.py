"""Protobuf <-> domain conversion: every field survives the round trip."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from finetune.v1 import trainer_pb2 as pb
from trainer.config import JobConfig
from trainer.data.report import Finding, Report
from trainer.service.convert import dataset_report, hyperparameters, job_config, report_of

ROOT = Path(__file__).resolve().parents[1]


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


def test_hyperparameters_are_job_config_and_round_trip() -> None:
    """The message's fields are JobConfig's, one for one (adding a hyperparameter is the
    proto, JobConfig and the recipe that uses it), and each one survives the round trip."""
    assert {f.name for f in pb.Hyperparameters.DESCRIPTOR.fields} == {
        f.name for f in fields(JobConfig)
    }
    cfg = JobConfig(
        lora_rank=16, lora_alpha=8.0, lora_dropout=0.1, target_modules=("q_proj", "v_proj"),
        learning_rate=1e-3, warmup_steps=7, batch_size=3, gradient_accumulation_steps=5,
        max_seq_len=512, num_epochs=1.5, seed=9, checkpoint_every_steps=11, eval_every_steps=13,
    )  # fmt: skip
    defaults = JobConfig()
    assert all(getattr(cfg, f.name) != getattr(defaults, f.name) for f in fields(JobConfig))
    assert job_config(hyperparameters(cfg.to_dict())) == cfg
    assert job_config(pb.Hyperparameters()) == defaults  # unset: the recipe's defaults


def test_the_contract_documents_each_default_as_job_config_has_it() -> None:
    """trainer.proto says "Default N." for the numeric hyperparameters: N is JobConfig's."""
    text = (ROOT / "proto" / "finetune" / "v1" / "trainer.proto").read_text()
    block = text[text.index("message Hyperparameters {") :].split("\n}", 1)[0]
    said = {}
    for comment, name in re.findall(r"((?:\s*//.*\n)+)\s*(?:optional|repeated) \w+ (\w+) =", block):
        if m := re.search(r"Default ([0-9.e+-]+)\.", " ".join(comment.split())):
            said[name] = float(m.group(1))
    defaults = JobConfig()
    assert said and all(said[n] == getattr(defaults, n) for n in said), said
    assert len(said) >= 9


def test_a_stored_config_keeps_loading_when_hyperparameters_change(caplog) -> None:
    """Jobs are stored with their config as JSON: one written before a hyperparameter was
    removed still loads (the rest kept), and says what it left out."""
    stored = {**JobConfig(lora_rank=8).to_dict(), "removed_since": 3}
    assert JobConfig.from_dict(stored) == JobConfig(lora_rank=8)
    assert "removed_since" in caplog.text
