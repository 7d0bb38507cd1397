"""Command line: ``python -m trainer`` (also installed as ``finetune``).

    serve                          run the gRPC service
    tenant add|list|remove         manage tenants on the data dir (prints a new key once)
    datasets upload|list|get|delete
    jobs create|get|list|watch|cancel
    adapters list|delete

Every flag has a FINETUNE_* environment fallback (shown in --help). Exit codes:
0 success, 1 the service refused (the status code is printed), 2 bad usage,
3 a watched job ended FAILED or CANCELLED.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

EXIT_REFUSED, EXIT_USAGE, EXIT_JOB_FAILED = 1, 2, 3


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"FINETUNE_{name}", default)


def _base_models(spec: str | None) -> dict[str, str]:
    """'name=path,other=path2' (or just 'path', served under its folder name)."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        out[name] = path
    return out


def _service_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=_env("DATA_DIR", "./data"),
        help="shared volume (env FINETUNE_DATA_DIR; default ./data)",
    )


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--addr",
        default=_env("ADDR", "127.0.0.1:50051"),
        help="trainer address (env FINETUNE_ADDR)",
    )
    p.add_argument("--api-key", default=_env("API_KEY"), help="API key (env FINETUNE_API_KEY)")
    p.add_argument(
        "--tenant",
        default=_env("TENANT"),
        help="act for this tenant (admin keys only; env FINETUNE_TENANT)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC service")
    _service_args(s)
    s.add_argument(
        "--listen",
        default=_env("LISTEN", "127.0.0.1:50051"),
        help="host:port (env FINETUNE_LISTEN; port 0 picks a free one)",
    )
    s.add_argument(
        "--base-model",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="allow a base model (repeatable; env FINETUNE_BASE_MODELS, comma-separated)",
    )
    s.add_argument(
        "--vllm-url",
        default=_env("VLLM_URL"),
        help="vLLM server to hot-load adapters into (env FINETUNE_VLLM_URL)",
    )
    s.add_argument(
        "--vllm-admin-key",
        default=_env("VLLM_ADMIN_KEY"),
        help="admin API key for vLLM's load/unload (env FINETUNE_VLLM_ADMIN_KEY)",
    )
    s.add_argument(
        "--tenants-file",
        default=_env("TENANTS_FILE"),
        help="tenants and key hashes (env FINETUNE_TENANTS_FILE; default DATA/tenants.json)",
    )
    s.add_argument(
        "--max-upload-bytes",
        type=int,
        default=int(_env("MAX_UPLOAD_BYTES", str(1 << 30))),
        help="largest accepted upload (env FINETUNE_MAX_UPLOAD_BYTES)",
    )
    s.add_argument(
        "--max-lora-rank",
        type=int,
        default=int(_env("MAX_LORA_RANK", "64")),
        help="the vLLM server's --max-lora-rank (env FINETUNE_MAX_LORA_RANK)",
    )
    s.add_argument(
        "--gpu-memory-budget",
        type=float,
        default=float(b) if (b := _env("GPU_MEMORY_BUDGET")) else None,
        metavar="FRACTION",
        help="share of the GPU's memory the trainer may use; vLLM's "
        "--gpu-memory-utilization takes the rest (env FINETUNE_GPU_MEMORY_BUDGET)",
    )
    s.add_argument(
        "--devices", type=int, default=None, help="jobs at once (default: one per GPU, or 1 on CPU)"
    )
    s.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))

    t = sub.add_parser("tenant", help="manage tenants and their API keys")
    tsub = t.add_subparsers(dest="action", required=True)
    for name, hlp in (
        ("add", "create a tenant; its key is printed once"),
        ("remove", "remove a tenant; its key stops working"),
    ):
        a = tsub.add_parser(name, help=hlp)
        a.add_argument("name")
        _service_args(a)
        a.add_argument("--tenants-file", default=_env("TENANTS_FILE"))
        if name == "add":
            a.add_argument("--admin", action="store_true", help="may act for every tenant")
    a = tsub.add_parser("list", help="list tenants")
    _service_args(a)
    a.add_argument("--tenants-file", default=_env("TENANTS_FILE"))

    d = sub.add_parser("datasets", help="upload and manage datasets")
    dsub = d.add_subparsers(dest="action", required=True)
    a = dsub.add_parser("upload", help="upload a JSONL file")
    a.add_argument("file", type=Path)
    a.add_argument("--name", help="dataset name (default: the file's stem)")
    _client_args(a)
    for name in ("list", "get", "delete"):
        a = dsub.add_parser(name)
        if name != "list":
            a.add_argument("id")
        _client_args(a)

    j = sub.add_parser("jobs", help="create and follow fine-tuning jobs")
    jsub = j.add_subparsers(dest="action", required=True)
    a = jsub.add_parser("create", help="queue a job")
    a.add_argument("--base-model", required=True)
    a.add_argument("--dataset", required=True, help="dataset id")
    a.add_argument("--adapter", required=True, help="adapter name")
    a.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyperparameter, e.g. --set lora_rank=16 --set num_epochs=1",
    )
    a.add_argument("--watch", action="store_true", help="follow it until it ends")
    _client_args(a)
    for name in ("get", "watch", "cancel", "list"):
        a = jsub.add_parser(name)
        if name != "list":
            a.add_argument("id")
        _client_args(a)

    ad = sub.add_parser("adapters", help="list and delete published adapters")
    asub = ad.add_subparsers(dest="action", required=True)
    a = asub.add_parser("list")
    _client_args(a)
    a = asub.add_parser("delete")
    a.add_argument("name")
    _client_args(a)
    return parser


# ---------------------------------------------------------------- commands
def _registry(args: argparse.Namespace) -> Any:
    from trainer.tenants import TenantRegistry

    return TenantRegistry(Path(args.tenants_file or Path(args.data_dir) / "tenants.json"))


def cmd_serve(args: argparse.Namespace) -> int:
    from trainer.config import ServiceConfig
    from trainer.server import serve

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    models = _base_models(_env("BASE_MODELS"))
    models.update(_base_models(",".join(args.base_model or [])))
    cfg = ServiceConfig(
        data_dir=Path(args.data_dir),
        listen=args.listen,
        base_models=models,
        vllm_url=args.vllm_url,
        vllm_admin_key=args.vllm_admin_key,
        tenants_file=Path(args.tenants_file) if args.tenants_file else None,
        max_upload_bytes=args.max_upload_bytes,
        max_lora_rank=args.max_lora_rank,
        devices=args.devices,
        gpu_memory_budget=args.gpu_memory_budget,
    )
    asyncio.run(serve(cfg))
    return 0


def cmd_tenant(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.action == "add":
        key = reg.add(args.name, admin=args.admin)
        print(key)
        print(f"tenant {args.name!r} created; the key above is shown only once", file=sys.stderr)
    elif args.action == "remove":
        reg.remove(args.name)
        print(f"tenant {args.name!r} removed", file=sys.stderr)
    else:
        for t in reg.list():
            print(f"{t.name}\t{'admin' if t.admin else 'tenant'}")
    return 0


def _hp_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _print(args: argparse.Namespace, msg: Any, text: str) -> None:
    from google.protobuf.json_format import MessageToDict

    if args.json:
        items = [MessageToDict(m) for m in msg] if isinstance(msg, list) else MessageToDict(msg)
        print(json.dumps(items, indent=2))
    else:
        print(text)


def _watch(client: Any, job_id: str, as_json: bool) -> int:
    from finetune.v1 import trainer_pb2 as pb

    bar = None
    state = pb.JOB_STATE_UNSPECIFIED
    for ev in client.watch_job(job_id):
        state = ev.state
        if as_json:
            from google.protobuf.json_format import MessageToDict

            print(json.dumps(MessageToDict(ev)), flush=True)
            continue
        if ev.HasField("progress") and ev.progress.total_steps:
            from tqdm import tqdm

            p = ev.progress
            if bar is None:
                bar = tqdm(total=p.total_steps, unit="step", desc=job_id)
            bar.n = p.step
            bar.set_postfix(
                loss=f"{p.loss:.4f}" if p.HasField("loss") else "-",
                eta=f"{p.eta_seconds:.0f}s" if p.HasField("eta_seconds") else "-",
            )
            bar.refresh()
        else:
            if bar is not None:
                bar.close()
                bar = None
            print(
                f"[{pb.JobState.Name(ev.state).removeprefix('JOB_STATE_')}] {ev.message}",
                flush=True,
            )
    if bar is not None:
        bar.close()
    return 0 if state == pb.JOB_STATE_SUCCEEDED else EXIT_JOB_FAILED


def cmd_client(args: argparse.Namespace) -> int:
    from finetune.v1 import trainer_pb2 as pb
    from trainer.client import TrainerClient

    if not args.api_key:
        print("error: an API key is needed (--api-key or FINETUNE_API_KEY)", file=sys.stderr)
        return EXIT_USAGE
    with TrainerClient(args.addr, args.api_key, args.tenant) as c:
        group, action = args.command, args.action
        if (group, action) == ("datasets", "upload"):
            from tqdm import tqdm

            with tqdm(
                total=args.file.stat().st_size,
                unit="B",
                unit_scale=True,
                desc=args.file.name,
                disable=args.json,
            ) as bar:
                ds = c.upload_dataset(args.file, args.name or args.file.stem, bar.update)
            _print(args, ds, f"{ds.id}\t{ds.name}\t{ds.num_rows} rows\tsha256 {ds.sha256}")
        elif (group, action) == ("datasets", "list"):
            items = c.list_datasets()
            _print(args, items, "\n".join(f"{d.id}\t{d.name}\t{d.num_rows} rows" for d in items))
        elif (group, action) == ("datasets", "get"):
            d = c.get_dataset(args.id)
            _print(args, d, f"{d.id}\t{d.name}\t{d.num_rows} rows\tsha256 {d.sha256}")
        elif (group, action) == ("datasets", "delete"):
            c.delete_dataset(args.id)
        elif (group, action) == ("jobs", "create"):
            hp = {}
            for kv in args.set:
                k, sep, v = kv.partition("=")
                if not sep:
                    print(f"error: --set {kv!r} is not KEY=VALUE", file=sys.stderr)
                    return EXIT_USAGE
                hp[k] = _hp_value(v)
            try:
                job = c.create_job(args.base_model, args.dataset, args.adapter, **hp)
            except (ValueError, TypeError) as e:
                print(f"error: hyperparameters: {e}", file=sys.stderr)
                return EXIT_USAGE
            _print(args, job, f"{job.id}\t{pb.JobState.Name(job.state)}")
            if args.watch:
                return _watch(c, job.id, args.json)
        elif (group, action) == ("jobs", "get"):
            job = c.get_job(args.id)
            _print(args, job, f"{job.id}\t{pb.JobState.Name(job.state)}\t{job.error_message}")
        elif (group, action) == ("jobs", "list"):
            items = c.list_jobs()
            _print(
                args,
                items,
                "\n".join(f"{j.id}\t{j.adapter_name}\t{pb.JobState.Name(j.state)}" for j in items),
            )
        elif (group, action) == ("jobs", "watch"):
            return _watch(c, args.id, args.json)
        elif (group, action) == ("jobs", "cancel"):
            job = c.cancel_job(args.id)
            _print(args, job, f"{job.id}\t{pb.JobState.Name(job.state)}")
        elif (group, action) == ("adapters", "list"):
            items = c.list_adapters()
            _print(args, items, "\n".join(f"{a.served_name}\t{a.version}" for a in items))
        elif (group, action) == ("adapters", "delete"):
            c.delete_adapter(args.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import grpc

    from trainer.errors import DomainError

    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "tenant":
            return cmd_tenant(args)
        return cmd_client(args)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return EXIT_REFUSED
    except DomainError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
