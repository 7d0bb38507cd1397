"""Command line: ``finetune`` (also ``python -m trainer``).

    serve                          run the gRPC service (and, with --metrics-listen, /metrics)
    tenant add|list|remove         manage tenants on the data dir (prints a new key once)
    datasets upload|list|get|delete
    jobs create|get|list|watch|cancel|plot
    adapters list|delete
    chat ADAPTER                   talk to an adapter through vLLM's OpenAI endpoint

Every flag has a FINETUNE_* environment fallback (shown in --help); `--json` prints
machine-readable output on stdout. Exit codes, for scripts:
  0  success
  1  the service refused the request (bad argument, already exists, precondition, ...)
  2  bad usage: a wrong flag, an unreadable local file, no API key
  3  a watched job ended FAILED or CANCELLED
  4  not found: no such job, dataset, adapter or tenant (for this key)
  5  the API key was refused
  6  the service could not be reached
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from trainer.config import ServiceConfig
from trainer.flags import add_flags, from_flags

if TYPE_CHECKING:
    from trainer.data.report import Report

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_JOB_FAILED = 0, 1, 2, 3
EXIT_NOT_FOUND, EXIT_AUTH, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 4, 5, 6, 130


class UsageError(Exception):
    """The command line or a local file is wrong (exit 2)."""


@overload
def _env(name: str) -> str | None: ...
@overload
def _env(name: str, default: str) -> str: ...
def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"FINETUNE_{name}", default)


# ---------------------------------------------------------------- the parser
# The volume's flags, for `serve` and for the commands that work on the volume directly.
VOLUME_FIELDS = ("data_dir", "tenants_file", "tenants_store")


def _service_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, ServiceConfig, only=("data_dir",))


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--addr",
        default=_env("ADDR", "127.0.0.1:50051"),
        help="trainer address (env FINETUNE_ADDR; default 127.0.0.1:50051)",
    )
    p.add_argument("--api-key", default=_env("API_KEY"), help="API key (env FINETUNE_API_KEY)")
    p.add_argument(
        "--tenant",
        default=_env("TENANT"),
        help="act for this tenant (admin keys only; env FINETUNE_TENANT)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def _tenant_file_args(p: argparse.ArgumentParser) -> None:
    add_flags(p, ServiceConfig, only=VOLUME_FIELDS)


def service_config(args: argparse.Namespace, only: tuple[str, ...] | None = None) -> ServiceConfig:
    """The ``ServiceConfig`` the flags (and their environment fallbacks) describe."""
    try:
        return from_flags(ServiceConfig, args, only=only)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _serve_parser(sub: Any) -> None:
    add_flags(sub.add_parser("serve", help="run the gRPC service"), ServiceConfig)


def _tenant_parser(sub: Any) -> None:
    t = sub.add_parser("tenant", help="manage tenants and their API keys (on the data dir)")
    tsub = t.add_subparsers(dest="action", required=True)
    a = tsub.add_parser("add", help="create a tenant; its key is printed once")
    a.add_argument("name")
    a.add_argument("--admin", action="store_true", help="may act for every tenant")
    _tenant_file_args(a)
    a = tsub.add_parser("remove", help="remove a tenant; its key stops working")
    a.add_argument("name")
    _tenant_file_args(a)
    a = tsub.add_parser("list", help="list tenants")
    _tenant_file_args(a)
    a.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def _datasets_parser(sub: Any) -> None:
    d = sub.add_parser("datasets", help="upload and manage datasets")
    dsub = d.add_subparsers(dest="action", required=True)
    a = dsub.add_parser("upload", help="upload a JSONL (or Parquet) file; shows a progress bar")
    a.add_argument("file", type=Path)
    a.add_argument("--name", help="dataset name (default: the file's stem)")
    a.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    a.add_argument(
        "--base-model",
        help="then print the report a job on this base would compute (ValidateDataset)",
    )
    _client_args(a)
    a = dsub.add_parser("list", help="your datasets, as a table")
    _client_args(a)
    a = dsub.add_parser(
        "validate",
        help="check a file offline, as an upload (and, with --model, a job) would",
        description="Check a JSONL or Parquet file on this machine, before uploading it: "
        "every line as the upload does, and with --model (a local base model folder) the "
        "report a job computes with that model's tokenizer and chat template: tokens per "
        "example, truncation, the share of tokens with loss, EOS among the labels, steps. "
        "Exit 0 when a job would accept it, 1 when not.",
    )
    a.add_argument("file", type=Path)
    a.add_argument("--model", type=Path, help="local base model folder (tokenizer + template)")
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter as the job would get it (max_seq_len, batch_size, ...)",
    )
    a.add_argument("--eval-fraction", type=float, default=0.0, help="share held out for eval")
    add_flags(a, ServiceConfig, only=("min_examples",))
    a.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    for name, hlp in (("get", "one dataset"), ("delete", "delete a dataset")):
        a = dsub.add_parser(name, help=hlp)
        a.add_argument("id", help="dataset id (ds-...)")
        _client_args(a)


def _jobs_parser(sub: Any) -> None:
    j = sub.add_parser("jobs", help="create and follow fine-tuning jobs")
    jsub = j.add_subparsers(dest="action", required=True)
    a = jsub.add_parser(
        "create",
        help="queue a job",
        description="Queue a fine-tuning job. Settings come from --config FILE.yaml, then "
        "flags (flags win). The YAML file holds base_model, dataset, adapter, "
        "validation_dataset, eval_fraction and hyperparameters (nested under "
        "'hyperparameters:' or at the top level), e.g.\n\n"
        "  base_model: tiny\n  dataset: ds-0123456789abcdef\n  adapter: secret\n"
        "  hyperparameters:\n    lora_rank: 16\n    learning_rate: 2.0e-4\n"
        "    target_modules: [q_proj, v_proj]\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a.add_argument(
        "--config", "-f", type=Path, help="YAML file of job settings and hyperparameters"
    )
    a.add_argument("--base-model", help="a base model the server allows")
    a.add_argument("--dataset", help="dataset id")
    a.add_argument("--adapter", help="adapter name (served as <tenant>/<adapter>)")
    a.add_argument("--validation-dataset", help="dataset id of an eval set")
    a.add_argument("--eval-fraction", type=float, help="carve this share out as an eval set")
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyperparameter, e.g. --set lora_rank=16 --set target_modules=q_proj,v_proj",
    )
    a.add_argument("--watch", action="store_true", help="follow it until it ends")
    _client_args(a)
    a = jsub.add_parser("list", help="your jobs, as a table")
    a.add_argument(
        "--state",
        action="append",
        default=[],
        choices=["queued", "validating", "running", "succeeded", "failed", "cancelled"],
        help="only jobs in this state (repeatable)",
    )
    a.add_argument("--adapter", default="", help="only jobs for this adapter name")
    _client_args(a)
    for name, hlp in (
        ("get", "one job, in detail"),
        ("watch", "live progress until the job ends (exit 3 if it fails)"),
        ("cancel", "cancel a queued or running job"),
    ):
        a = jsub.add_parser(name, help=hlp)
        a.add_argument("id", help="job id (job-...)")
        _client_args(a)
    a = jsub.add_parser("plot", help="save the loss curves of a job as a PNG")
    a.add_argument("id", help="job id (job-...)")
    a.add_argument("-o", "--output", type=Path, help="PNG file (default: <job id>.png)")
    _client_args(a)


def _adapters_parser(sub: Any) -> None:
    ad = sub.add_parser(
        "adapters", help="published adapters: versions, rollback, download, merged export"
    )
    asub = ad.add_subparsers(dest="action", required=True)
    a = asub.add_parser("list", help="your adapters and the version each serves, as a table")
    _client_args(a)
    a = asub.add_parser("delete", help="unpublish an adapter (every version)")
    a.add_argument("name")
    _client_args(a)
    a = asub.add_parser("versions", help="every version of an adapter, with its manifest")
    a.add_argument("name")
    _client_args(a)
    a = asub.add_parser(
        "pin",
        help="serve an earlier version under the adapter's name (a rollback)",
        description="vLLM serves it at once, without a restart; new versions are still "
        "published (as NAME@vNNNN) but not served under NAME until `adapters unpin`.",
    )
    a.add_argument("name")
    a.add_argument("version", help="e.g. v0001")
    _client_args(a)
    a = asub.add_parser("unpin", help="serve the newest version again, now and later")
    a.add_argument("name")
    _client_args(a)
    a = asub.add_parser("delete-version", help="remove one version that is not served")
    a.add_argument("name")
    a.add_argument("version")
    _client_args(a)
    a = asub.add_parser(
        "download",
        help="a version as a PEFT folder (PeftModel.from_pretrained, vllm --lora-modules)",
    )
    a.add_argument("name", help="NAME (the version served) or NAME@vNNNN")
    a.add_argument("-o", "--output", type=Path, required=True, help="a new or empty folder")
    _client_args(a)
    a = asub.add_parser(
        "export",
        help="queue a merged export: the version merged into the bf16 base",
        description="A job of kind MERGE_EXPORT; once it has SUCCEEDED, "
        "`finetune exports download JOB -o DIR` fetches the model folder.",
    )
    a.add_argument("name", help="NAME (the version served) or NAME@vNNNN")
    a.add_argument("--watch", action="store_true", help="follow it until it ends")
    _client_args(a)


def _exports_parser(sub: Any) -> None:
    ex = sub.add_parser("exports", help="merged models made by `adapters export`")
    esub = ex.add_subparsers(dest="action", required=True)
    a = esub.add_parser("download", help="a merged export as a Hugging Face model folder")
    a.add_argument("id", help="the export's job id (job-...)")
    a.add_argument("-o", "--output", type=Path, required=True, help="a new or empty folder")
    _client_args(a)
    a = esub.add_parser("delete", help="free a merged export's bytes")
    a.add_argument("id", help="the export's job id (job-...)")
    _client_args(a)


def _usage_parser(sub: Any) -> None:
    u = sub.add_parser("usage", help="what your tenant has used and stores, and its limits")
    u.set_defaults(action="show")
    _client_args(u)


def _chat_parser(sub: Any) -> None:
    c = sub.add_parser(
        "chat",
        help="talk to an adapter (streaming), through vLLM's OpenAI-compatible endpoint",
        description="Each line you type is a turn; the answer streams in. /reset forgets "
        "the conversation, /exit or Ctrl-D leaves. With --message, or with a pipe on "
        "stdin, it answers and exits.",
    )
    c.add_argument(
        "adapter",
        help="'<tenant>/<adapter>', your adapter's name (NAME@vNNNN: that version), "
        "or a base model",
    )
    c.add_argument(
        "--base-url",
        default=_env("OPENAI_URL", "http://127.0.0.1:8000/v1"),
        help="the OpenAI-compatible endpoint (env FINETUNE_OPENAI_URL; "
        "default http://127.0.0.1:8000/v1)",
    )
    c.add_argument("-m", "--message", action="append", help="send this and exit (repeatable)")
    c.add_argument("--system", help="a system prompt")
    c.add_argument("--max-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0)
    _client_args(c)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _serve_parser,
        _tenant_parser,
        _datasets_parser,
        _jobs_parser,
        _adapters_parser,
        _exports_parser,
        _usage_parser,
        _chat_parser,
    ):
        add(sub)
    return parser


# ---------------------------------------------------------------- output
def _to_dict(msg: Any) -> Any:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True)


def _emit(args: argparse.Namespace, msg: Any, text: str | Callable[[], str]) -> None:
    """``msg`` (a message or a list of them) as JSON with --json, else ``text``."""
    if args.json:
        items = [_to_dict(m) for m in msg] if isinstance(msg, list) else _to_dict(msg)
        print(json.dumps(items, indent=2))
    else:
        print(text() if callable(text) else text)


def _note(args: argparse.Namespace, text: str) -> None:
    """A message for people, on stderr (stdout stays clean for --json)."""
    print(text, file=sys.stderr)


# ---------------------------------------------------------------- serve and tenants
def cmd_serve(args: argparse.Namespace) -> int:
    from trainer.service import logs
    from trainer.service.server import serve

    cfg = service_config(args)
    logs.setup(cfg.log_level, cfg.log_format)
    asyncio.run(serve(cfg, metrics_listen=cfg.metrics_listen))
    return EXIT_OK


def cmd_tenant(args: argparse.Namespace) -> int:
    from trainer.tenants import tenant_registry

    cfg = service_config(args, only=VOLUME_FIELDS)
    reg = tenant_registry(cfg.tenants_file, cfg.tenants_store)
    if args.action == "add":
        key = reg.add(args.name, admin=args.admin)
        print(key)
        print(f"tenant {args.name!r} created; the key above is shown only once", file=sys.stderr)
    elif args.action == "remove":
        reg.remove(args.name)
        print(f"tenant {args.name!r} removed", file=sys.stderr)
    else:
        tenants = reg.list()
        if args.json:
            print(json.dumps([{"name": t.name, "admin": t.admin} for t in tenants], indent=2))
        else:
            from trainer.cli.console import table

            rows = [(t.name, "admin" if t.admin else "tenant") for t in tenants]
            print(table(("TENANT", "ROLE"), rows, empty="no tenants"))
    return EXIT_OK


# ---------------------------------------------------------------- datasets
def _readable_file(path: Path) -> Path:
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: not readable")
    return path


def datasets_upload(c: Any, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    path = _readable_file(args.file)
    with tqdm(
        total=path.stat().st_size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"uploading {path.name}",
        disable=args.json or args.quiet,
        file=sys.stderr,
        leave=True,
    ) as bar:
        ds = c.upload_dataset(path, args.name or path.stem, bar.update)
    _emit(args, ds, f"{ds.id}\t{ds.name}\t{ds.num_rows} rows\tsha256 {ds.sha256}")
    if args.base_model:
        from trainer.service import convert

        return _print_report(args, convert.report_of(c.validate_dataset(ds.id, args.base_model)))
    return EXIT_OK


def _print_report(args: argparse.Namespace, report: Report) -> int:
    """A dataset report as JSON or text; refused (1) unless it has no error."""
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return EXIT_OK if report.ok else EXIT_REFUSED


def datasets_validate(args: argparse.Namespace) -> int:
    """Offline: the upload's checks, then (with --model) the job's report."""
    from trainer.config import EvalSplit, JobSpec
    from trainer.data.examples import scan

    path = _readable_file(args.file)
    found = scan(path, args.min_examples)
    if args.model is None:
        summary = {"format": found.format, "file_type": found.file_type, "examples": found.examples}
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"{path.name}: {found.examples} {found.format} examples ({found.file_type}): ok")
        return EXIT_OK
    from trainer.data.report import for_spec
    from trainer.data.tokens import load_tokenizer

    if not (args.model / "config.json").is_file():
        raise UsageError(f"{args.model}: not a model folder (no config.json)")
    from finetune.v1 import trainer_pb2 as pb
    from trainer.service import convert

    hp = _set_items(args.set, _hyperparameter_fields())
    cfg = convert.job_config(pb.Hyperparameters(**hp)).validate()
    split = EvalSplit(fraction=args.eval_fraction).validate()
    spec = JobSpec(
        job_id="local",
        base_model=args.model.name,
        base_model_path=str(args.model),
        dataset_path=str(path),
        job_dir="",
        config=cfg,
        dataset_format=found.format,
        dataset_examples=found.examples,
        eval_fraction=split.fraction,
    )
    return _print_report(args, for_spec(spec, load_tokenizer(args.model), packing=False))


def datasets_list(c: Any, args: argparse.Namespace) -> int:
    from trainer.cli.console import datasets_table

    items = c.list_datasets()
    _emit(args, items, lambda: datasets_table(items))
    return EXIT_OK


def datasets_get(c: Any, args: argparse.Namespace) -> int:
    d = c.get_dataset(args.id)
    _emit(args, d, f"{d.id}\t{d.name}\t{d.num_rows} rows\tsha256 {d.sha256}")
    return EXIT_OK


def datasets_delete(c: Any, args: argparse.Namespace) -> int:
    c.delete_dataset(args.id)
    _note(args, f"dataset {args.id} deleted")
    return EXIT_OK


# ---------------------------------------------------------------- jobs
_JOB_KEYS = {
    "base_model": "base_model",
    "dataset": "dataset",
    "dataset_id": "dataset",
    "adapter": "adapter",
    "adapter_name": "adapter",
    "validation_dataset": "validation_dataset",
    "validation_dataset_id": "validation_dataset",
    "eval_fraction": "eval_fraction",
}


def _hyperparameter_fields() -> dict[str, Any]:
    from finetune.v1 import trainer_pb2 as pb

    return {f.name: f for f in pb.Hyperparameters.DESCRIPTOR.fields}


def _unknown(key: str, known: list[str]) -> UsageError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return UsageError(f"unknown setting {key!r}{hint}")


def _hp_value(field: Any, raw: Any) -> Any:
    """A hyperparameter from YAML or --set, as its protobuf field wants it."""
    if isinstance(raw, str):
        with contextlib.suppress(json.JSONDecodeError):
            raw = json.loads(raw)
    if field.is_repeated:
        if isinstance(raw, str):
            return [s.strip() for s in raw.split(",") if s.strip()]
        if not isinstance(raw, list):
            raise UsageError(f"{field.name}: a list is expected, not {raw!r}")
    elif field.type in (field.TYPE_INT32, field.TYPE_INT64):
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise UsageError(f"{field.name}: an integer is expected, not {raw!r}")
    elif field.type == field.TYPE_DOUBLE:
        if not isinstance(raw, int | float) or isinstance(raw, bool):
            raise UsageError(f"{field.name}: a number is expected, not {raw!r}")
        raw = float(raw)
    return raw


def _set_items(items: list[str], fields: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters from ``--set KEY=VALUE`` flags."""
    hp: dict[str, Any] = {}
    for kv in items:
        key, sep, raw = kv.partition("=")
        if not sep:
            raise UsageError(f"--set {kv!r} is not KEY=VALUE")
        if key not in fields:
            raise _unknown(key, list(fields))
        hp[key] = _hp_value(fields[key], raw)
    return hp


def job_settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(job settings, hyperparameters) from --config, then flags and --set (flags win)."""
    fields = _hyperparameter_fields()
    job: dict[str, Any] = {}
    hp: dict[str, Any] = {}
    if args.config is not None:
        import yaml

        try:
            doc = yaml.safe_load(_readable_file(args.config).read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UsageError(f"{args.config}: not YAML: {e}") from e
        if not isinstance(doc, dict):
            raise UsageError(f"{args.config}: a mapping of settings is expected")
        nested = doc.pop("hyperparameters", None) or {}
        if not isinstance(nested, dict):
            raise UsageError(f"{args.config}: 'hyperparameters' must be a mapping")
        for key, value in {**doc, **nested}.items():
            if key in _JOB_KEYS and key not in nested:
                job[_JOB_KEYS[key]] = value
            elif key in fields:
                hp[key] = _hp_value(fields[key], value)
            else:
                raise _unknown(str(key), [*fields, *_JOB_KEYS])
    for key in ("base_model", "dataset", "adapter", "validation_dataset", "eval_fraction"):
        if getattr(args, key) is not None:
            job[key] = getattr(args, key)
    hp.update(_set_items(args.set, fields))
    missing = [k for k in ("base_model", "dataset", "adapter") if not job.get(k)]
    if missing:
        flags = ", ".join("--" + k.replace("_", "-") for k in missing)
        raise UsageError(f"missing {flags} (a flag or a key of --config)")
    return job, hp


def jobs_create(c: Any, args: argparse.Namespace) -> int:
    job_cfg, hp = job_settings(args)
    job = c.create_job(
        str(job_cfg["base_model"]),
        str(job_cfg["dataset"]),
        str(job_cfg["adapter"]),
        validation_dataset_id=job_cfg.get("validation_dataset"),
        eval_fraction=job_cfg.get("eval_fraction"),
        **hp,
    )
    from trainer.cli.console import state_name

    if args.json and args.watch:  # JSON lines: the job, then each event
        print(json.dumps(_to_dict(job)), flush=True)
    else:
        _emit(args, job, f"{job.id}\t{state_name(job.state)}")
    if args.watch:
        return _watch(c, job.id, args)
    return EXIT_OK


def _watch(c: Any, job_id: str, args: argparse.Namespace) -> int:
    from finetune.v1 import trainer_pb2 as pb
    from trainer.cli.console import WatchView, state_name

    state, last = pb.JOB_STATE_UNSPECIFIED, ""
    view = None if args.json else WatchView(sys.stdout)
    try:
        for ev in c.watch_job(job_id):
            state = ev.state
            if view is None:
                print(json.dumps(_to_dict(ev)), flush=True)
            else:
                view.event(ev)
            if not ev.HasField("progress"):
                last = ev.message
    except KeyboardInterrupt:
        if view is not None:
            view.close()
        _note(args, f"stopped watching; the job goes on (finetune jobs cancel {job_id} stops it)")
        return EXIT_INTERRUPTED
    finally:
        if view is not None:
            view.close()
    if state != pb.JOB_STATE_SUCCEEDED:
        _note(args, f"job {job_id} ended {state_name(state)}: {last}")
        return EXIT_JOB_FAILED
    return EXIT_OK


def jobs_watch(c: Any, args: argparse.Namespace) -> int:
    return _watch(c, args.id, args)


def jobs_list(c: Any, args: argparse.Namespace) -> int:
    from finetune.v1 import trainer_pb2 as pb
    from trainer.cli.console import jobs_table

    states = [getattr(pb, f"JOB_STATE_{s.upper()}") for s in args.state]
    items = c.list_jobs(states, args.adapter)
    _emit(args, items, lambda: jobs_table(items))
    return EXIT_OK


def jobs_get(c: Any, args: argparse.Namespace) -> int:
    from trainer.cli.console import job_details

    job = c.get_job(args.id)
    _emit(args, job, lambda: job_details(job))
    return EXIT_OK


def jobs_cancel(c: Any, args: argparse.Namespace) -> int:
    from trainer.cli.console import state_name

    job = c.cancel_job(args.id)
    _emit(args, job, f"{job.id}\t{state_name(job.state)}")
    return EXIT_OK


def jobs_plot(c: Any, args: argparse.Namespace) -> int:
    from trainer.service import curves

    job = c.get_job(args.id)  # NOT_FOUND before anything is written
    progress = [_to_dict(ev.progress) for ev in c.job_events(args.id) if ev.HasField("progress")]
    out: Path = args.output or Path(f"{args.id}.png")
    series = curves.Series.from_progress(progress)
    plotted = curves.plot(series, out, f"{job.id}  {job.tenant}/{job.adapter_name}")
    if args.json:
        print(json.dumps({"job_id": job.id, "file": str(out), "series": plotted}, indent=2))
    else:
        n = len(plotted.get("loss", {}).get("step", []))
        m = len(plotted.get("eval_loss", {}).get("step", []))
        print(out)
        _note(args, f"{n} loss and {m} eval loss points plotted")
    return EXIT_OK


# ---------------------------------------------------------------- adapters
def adapters_list(c: Any, args: argparse.Namespace) -> int:
    from trainer.cli.console import adapters_table

    items = c.list_adapters()
    _emit(args, items, lambda: adapters_table(items))
    return EXIT_OK


def adapters_delete(c: Any, args: argparse.Namespace) -> int:
    c.delete_adapter(args.name)
    _note(args, f"adapter {args.name} deleted")
    return EXIT_OK


def adapters_versions(c: Any, args: argparse.Namespace) -> int:
    from trainer.cli.console import versions_table

    items = c.list_versions(args.name)
    _emit(args, items, lambda: versions_table(items))
    return EXIT_OK


def _served(args: argparse.Namespace, a: Any) -> None:
    how = "pinned" if a.pinned else "the newest"
    _emit(args, a, f"{a.served_name} serves {a.version} ({how}; newest {a.newest_version})")


def adapters_pin(c: Any, args: argparse.Namespace) -> int:
    _served(args, c.set_served_version(args.name, args.version))
    return EXIT_OK


def adapters_unpin(c: Any, args: argparse.Namespace) -> int:
    _served(args, c.set_served_version(args.name, ""))
    return EXIT_OK


def adapters_delete_version(c: Any, args: argparse.Namespace) -> int:
    c.delete_version(args.name, args.version)
    _note(args, f"{args.name} {args.version} deleted")
    return EXIT_OK


def _downloaded(args: argparse.Namespace, out: Path) -> int:
    files = sorted(p.name for p in out.iterdir())
    if args.json:
        print(json.dumps({"folder": str(out), "files": files}, indent=2))
    else:
        print(out)
        _note(args, f"{len(files)} files: {', '.join(files)}")
    return EXIT_OK


def adapters_download(c: Any, args: argparse.Namespace) -> int:
    return _downloaded(args, c.download(args.output, adapter=args.name))


def adapters_export(c: Any, args: argparse.Namespace) -> int:
    job = c.export_merged(args.name)
    if args.watch:
        return _watch(c, job.id, args)
    _emit(args, job, job.id)
    return EXIT_OK


def exports_download(c: Any, args: argparse.Namespace) -> int:
    return _downloaded(args, c.download(args.output, export_job_id=args.id))


def exports_delete(c: Any, args: argparse.Namespace) -> int:
    c.delete_export(args.id)
    _note(args, f"export {args.id} deleted")
    return EXIT_OK


def usage_show(c: Any, args: argparse.Namespace) -> int:
    from trainer.cli.console import usage_table

    u = c.usage()
    _emit(args, u, lambda: usage_table(u))
    return EXIT_OK


# ---------------------------------------------------------------- chat
def cmd_chat(args: argparse.Namespace) -> int:
    from trainer.cli.chat import ChatError, ChatSession, repl

    model = args.adapter
    if "/" not in model:  # a short adapter name (NAME or NAME@vNNNN): the trainer knows it
        import grpc

        from trainer.cli.client import TrainerClient

        name, at, version = model.partition("@")
        try:
            with TrainerClient(args.addr, args.api_key, args.tenant, timeout=5) as c:
                model = next(
                    (a.served_name + at + version for a in c.list_adapters() if a.name == name),
                    model,
                )
        except grpc.RpcError:
            pass  # a base model's name, or no trainer at hand: ask vLLM as it is
    session = ChatSession(
        args.base_url,
        args.api_key,
        model,
        system=args.system,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
    )
    try:
        if args.message:
            for text in args.message:
                for piece in session.ask(text):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                sys.stdout.write("\n")
        else:
            repl(session, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())
    except ChatError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.status in (401, 403):
            return EXIT_AUTH
        if e.status == 404:
            return EXIT_NOT_FOUND
        return EXIT_UNAVAILABLE if e.status == 0 else EXIT_REFUSED
    finally:
        session.close()
    return EXIT_OK


COMMANDS: dict[tuple[str, str], Callable[[Any, argparse.Namespace], int]] = {
    ("datasets", "upload"): datasets_upload,
    ("datasets", "list"): datasets_list,
    ("datasets", "get"): datasets_get,
    ("datasets", "delete"): datasets_delete,
    ("jobs", "create"): jobs_create,
    ("jobs", "list"): jobs_list,
    ("jobs", "get"): jobs_get,
    ("jobs", "watch"): jobs_watch,
    ("jobs", "cancel"): jobs_cancel,
    ("jobs", "plot"): jobs_plot,
    ("adapters", "list"): adapters_list,
    ("adapters", "delete"): adapters_delete,
    ("adapters", "versions"): adapters_versions,
    ("adapters", "pin"): adapters_pin,
    ("adapters", "unpin"): adapters_unpin,
    ("adapters", "delete-version"): adapters_delete_version,
    ("adapters", "download"): adapters_download,
    ("adapters", "export"): adapters_export,
    ("exports", "download"): exports_download,
    ("exports", "delete"): exports_delete,
    ("usage", "show"): usage_show,
}


def cmd_client(args: argparse.Namespace) -> int:
    from trainer.cli.client import TrainerClient

    command = COMMANDS[(args.command, args.action)]
    with TrainerClient(args.addr, args.api_key, args.tenant) as c:
        return command(c, args)


# ---------------------------------------------------------------- errors and main
def _exit_for(code_name: str) -> int:
    if code_name == "NOT_FOUND":
        return EXIT_NOT_FOUND
    if code_name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return EXIT_AUTH
    if code_name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return EXIT_UNAVAILABLE
    return EXIT_REFUSED


def _fail(args: argparse.Namespace, code: int, kind: str, message: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": kind, "message": message}}), file=sys.stderr)
    else:
        print(
            f"error: {kind}: {message}" if kind != "USAGE" else f"error: {message}", file=sys.stderr
        )
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import grpc

    from trainer.errors import DomainError, NotFound

    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "tenant":
            return cmd_tenant(args)
        if args.command == "datasets" and args.action == "validate":
            return datasets_validate(args)
        if not args.api_key:
            raise UsageError("an API key is needed (--api-key or FINETUNE_API_KEY)")
        if args.command == "chat":
            return cmd_chat(args)
        return cmd_client(args)
    except UsageError as e:
        return _fail(args, EXIT_USAGE, "USAGE", str(e))
    except grpc.RpcError as e:
        name = e.code().name if e.code() else "UNKNOWN"
        return _fail(args, _exit_for(name), name, e.details() or "")
    except NotFound as e:
        return _fail(args, EXIT_NOT_FOUND, "NOT_FOUND", str(e))
    except DomainError as e:
        return _fail(args, EXIT_REFUSED, type(e).__name__, str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
