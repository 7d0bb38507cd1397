"""Protobuf <-> domain conversion, the only place ``*_pb2`` objects meet domain types."""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from finetune.v1 import trainer_pb2 as pb
from trainer.config import EvalSplit, JobConfig
from trainer.data.report import Finding, Report
from trainer.errors import InvalidArgument
from trainer.names import served_name
from trainer.service.publish import AdapterView, VersionView
from trainer.service.store import (
    DatasetRecord,
    ErrorKind,
    EventRecord,
    JobKind,
    JobRecord,
    JobState,
)
from trainer.service.usage import Quotas, TenantUsage

_FORMATS = {
    "messages": pb.DATASET_FORMAT_MESSAGES,
    "prompt_completion": pb.DATASET_FORMAT_PROMPT_COMPLETION,
    "text": pb.DATASET_FORMAT_TEXT,
    "alpaca": pb.DATASET_FORMAT_ALPACA,
}
_SEVERITIES = {"error": pb.Finding.SEVERITY_ERROR, "warning": pb.Finding.SEVERITY_WARNING}
_STATES = {s: getattr(pb, f"JOB_STATE_{s.value}") for s in JobState}
_STATE_OF = {v: k for k, v in _STATES.items()}
_JOB_KINDS = {k: getattr(pb, f"JOB_KIND_{k.value}") for k in JobKind}
_KINDS = {
    ErrorKind.NONE: pb.ERROR_KIND_UNSPECIFIED,
    ErrorKind.USER: pb.ERROR_KIND_USER,
    ErrorKind.SYSTEM: pb.ERROR_KIND_SYSTEM,
}
# The scalar hyperparameters: every optional field of the message (each one a JobConfig
# field of the same name; tests/test_convert.py checks the two agree).
_HP_FIELDS = tuple(
    f.name
    for f in pb.Hyperparameters.DESCRIPTOR.fields
    if f.has_presence and f.name != "target_modules"
)
# Scalar fields shared by the DatasetReport message and the domain Report (the token
# stats, format and findings are converted by hand).
_REPORT_FIELDS = (
    "examples",
    "eval_examples",
    "truncated_examples",
    "truncated_tokens",
    "loss_token_share",
    "all_masked_examples",
    "examples_without_eos",
    "examples_with_special_tokens",
    "total_steps",
    "train_tokens",
    "loss_tokens",
)


def _ts(t: float | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def job_config(hp: pb.Hyperparameters) -> JobConfig:
    """Hyperparameters from a request: set fields override the recipe's defaults."""
    kwargs: dict[str, Any] = {f: getattr(hp, f) for f in _HP_FIELDS if hp.HasField(f)}
    if hp.target_modules:
        kwargs["target_modules"] = tuple(hp.target_modules)
    return JobConfig(**kwargs)


def hyperparameters(cfg: dict[str, Any]) -> pb.Hyperparameters:
    hp = pb.Hyperparameters(target_modules=cfg.get("target_modules", []))
    for f in _HP_FIELDS:
        if cfg.get(f) is not None:
            setattr(hp, f, cfg[f])
    return hp


def dataset(rec: DatasetRecord) -> pb.Dataset:
    return pb.Dataset(
        id=rec.id,
        tenant=rec.tenant,
        name=rec.name,
        sha256=rec.sha256,
        size_bytes=rec.size_bytes,
        num_rows=rec.num_rows,
        format=_FORMATS.get(rec.format, pb.DATASET_FORMAT_UNSPECIFIED),
        created_at=_ts(rec.created_at),
        file_type=rec.file_type,
    )


def eval_split(validation_dataset_id: str, fraction: float | None) -> EvalSplit:
    return EvalSplit(validation_dataset_id=validation_dataset_id, fraction=fraction or 0.0)


def report_of(msg: pb.DatasetReport) -> Report:
    """The domain report back from its message (for the command line's text)."""
    formats = {v: k for k, v in _FORMATS.items()}
    severities = {v: k for k, v in _SEVERITIES.items()}
    return Report(
        format=formats.get(msg.format, ""),
        tokens_min=msg.tokens.min,
        tokens_mean=msg.tokens.mean,
        tokens_max=msg.tokens.max,
        findings=[
            Finding(severities[f.severity], f.code, f.message, f.count, list(f.lines))
            for f in msg.findings
        ],
        **{f: getattr(msg, f) for f in _REPORT_FIELDS},
    )


def dataset_report(d: dict[str, Any] | None) -> pb.DatasetReport | None:
    if not d:
        return None
    r = Report.from_dict(d)
    return pb.DatasetReport(
        format=_FORMATS.get(r.format, pb.DATASET_FORMAT_UNSPECIFIED),
        tokens=pb.TokenStats(min=r.tokens_min, mean=r.tokens_mean, max=r.tokens_max),
        findings=[
            pb.Finding(
                severity=_SEVERITIES[f.severity],
                code=f.code,
                message=f.message,
                count=f.count,
                lines=f.lines,
            )
            for f in r.findings
        ],
        ok=r.ok,
        **{f: getattr(r, f) for f in _REPORT_FIELDS},
    )


def progress(p: dict[str, Any] | None) -> pb.Progress | None:
    if not p:
        return None
    fields = {k: v for k, v in p.items() if k in pb.Progress.DESCRIPTOR.fields_by_name}
    return pb.Progress(**{k: v for k, v in fields.items() if v is not None})


def job(rec: JobRecord) -> pb.Job:
    return pb.Job(
        id=rec.id,
        tenant=rec.tenant,
        base_model=rec.base_model,
        dataset_id=rec.dataset_id,
        adapter_name=rec.adapter_name,
        hyperparameters=hyperparameters(rec.config),
        state=_STATES[rec.state],
        error_kind=_KINDS[rec.error_kind],
        error_message=rec.error_message,
        progress=progress(rec.progress),
        adapter_version=rec.adapter_version,
        served_name=served_name(rec.tenant, rec.adapter_name) if rec.adapter_version else "",
        created_at=_ts(rec.created_at),
        started_at=_ts(rec.started_at),
        finished_at=_ts(rec.finished_at),
        validation_dataset_id=rec.validation_dataset_id,
        eval_fraction=rec.eval_fraction,
        dataset_report=dataset_report(rec.report),
        kind=_JOB_KINDS[rec.kind],
        export_size_bytes=rec.export_size_bytes,
    )


def job_states(states: Any) -> tuple[JobState, ...]:
    """A ListJobs filter's states; UNSPECIFIED (or an unknown number) is refused."""
    try:
        return tuple(_STATE_OF[s] for s in states)
    except KeyError as e:
        raise InvalidArgument("states", f"{e.args[0]} is not a job state") from None


def event(ev: EventRecord) -> pb.JobEvent:
    return pb.JobEvent(
        job_id=ev.job_id,
        seq=ev.seq,
        time=_ts(ev.time),
        state=_STATES[ev.state],
        message=ev.message,
        progress=progress(ev.progress),
    )


def adapter(view: AdapterView) -> pb.Adapter:
    rec = view.served
    return pb.Adapter(
        tenant=rec.tenant,
        name=rec.name,
        served_name=served_name(rec.tenant, rec.name),
        version=rec.version,
        job_id=rec.job_id,
        base_model=rec.base_model,
        created_at=_ts(rec.created_at),
        newest_version=view.newest,
        pinned=view.pinned,
        version_count=view.version_count,
    )


def adapter_version(view: VersionView) -> pb.AdapterVersion:
    rec, manifest = view.record, view.manifest
    metrics = manifest.get("metrics") or {}
    eval_loss, train_loss = (
        metrics.get("best_eval_loss", metrics.get("eval_loss")),
        metrics.get("train_loss"),
    )
    return pb.AdapterVersion(
        version=rec.version,
        served_name=f"{served_name(rec.tenant, rec.name)}@{rec.version}",
        job_id=rec.job_id,
        dataset_id=view.dataset_id,
        dataset_sha256=manifest.get("dataset_sha256", ""),
        base_model=rec.base_model,
        hyperparameters=hyperparameters(manifest.get("hyperparameters") or {}),
        eval_loss=eval_loss,
        train_loss=train_loss,
        size_bytes=view.size_bytes,
        created_at=_ts(rec.created_at),
        served=view.served,
    )


def usage(u: TenantUsage, quotas: Quotas) -> pb.Usage:
    return pb.Usage(
        tenant=u.tenant,
        tokens_trained=u.tokens_trained,
        gpu_seconds=u.gpu_seconds,
        jobs_by_state=u.jobs_by_state,
        dataset_bytes=u.dataset_bytes,
        adapter_bytes=u.adapter_bytes,
        export_bytes=u.export_bytes,
        stored_bytes=u.stored_bytes,
        max_queued_jobs=quotas.max_queued_jobs,
        max_stored_bytes=quotas.max_stored_bytes,
    )
