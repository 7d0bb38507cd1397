"""Typed configuration: the job's hyperparameters and the service's settings.

Defaults are the reference QLoRA recipe (Dettmers et al. 2023 and the usual
7-8B practice): NF4 with double quantisation and bf16 compute, LoRA r=64,
alpha=2r, dropout 0.05 on all seven projections, lr 2e-4 with 100 warmup steps
then constant, batch 4 x accumulation 4, 2048 tokens, 3 epochs, paged 8-bit
AdamW. Protobuf is converted to these classes once, at the gRPC edge
(``trainer.service.convert``); nothing below it sees a ``*_pb2`` object.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trainer.errors import InvalidArgument
from trainer.layout import JobFolder, Layout

log = logging.getLogger(__name__)

# vLLM accepts only these LoRA ranks (vllm/config/lora.py, `max_lora_rank` choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Hyperparameters renamed since jobs were first stored, old name -> new (none yet): a
# stored job's config keeps loading across a rename (JobConfig.from_dict).
RENAMED_HYPERPARAMETERS: dict[str, str] = {}
# The seven linear projections of a Llama/Mistral/Qwen decoder layer.
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _module_name(name: str) -> str:
    """Accept "q" as well as "q_proj"."""
    full = name if name.endswith("_proj") else f"{name}_proj"
    if full not in ALL_PROJECTIONS:
        raise InvalidArgument(
            "hyperparameters.target_modules",
            f"{name!r} is not one of {', '.join(ALL_PROJECTIONS)}",
        )
    return full


@dataclass
class JobConfig:
    """Hyperparameters of one fine-tuning job."""

    lora_rank: int = field(default=64, metadata={"help": "LoRA rank; one of vLLM's ranks."})
    lora_alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha; None means 2 * lora_rank."}
    )
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: tuple[str, ...] = field(
        default=ALL_PROJECTIONS, metadata={"help": "Projections that get a LoRA."}
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warmup steps, then constant."})
    batch_size: int = field(default=4, metadata={"help": "Examples per device step."})
    gradient_accumulation_steps: int = field(
        default=4, metadata={"help": "Device steps per optimizer update."}
    )
    max_seq_len: int = field(default=2048, metadata={"help": "Tokens per example, at most."})
    num_epochs: float = field(default=3.0, metadata={"help": "Passes over the dataset."})
    seed: int = field(default=42, metadata={"help": "Random seed, recorded in the manifest."})
    checkpoint_every_steps: int = field(
        default=0, metadata={"help": "Checkpoint every N optimizer steps; 0 = each epoch."}
    )
    eval_every_steps: int = field(
        default=0,
        metadata={
            "help": "With an eval set: evaluate (and checkpoint) every N optimizer steps; "
            "0 = each epoch. The checkpoint with the lowest eval loss is published."
        },
    )

    def __post_init__(self) -> None:
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_rank
        self.target_modules = tuple(dict.fromkeys(_module_name(m) for m in self.target_modules))

    def validate(self, max_lora_rank: int = max(VLLM_LORA_RANKS)) -> JobConfig:
        """Raise ``InvalidArgument`` naming the first field out of range."""

        def bad(name: str, why: str) -> InvalidArgument:
            return InvalidArgument(f"hyperparameters.{name}", why)

        if self.lora_rank not in VLLM_LORA_RANKS:
            raise bad("lora_rank", f"{self.lora_rank} is not one of vLLM's ranks {VLLM_LORA_RANKS}")
        if self.lora_rank > max_lora_rank:
            raise bad("lora_rank", f"{self.lora_rank} exceeds the server's max {max_lora_rank}")
        assert self.lora_alpha is not None
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise bad("lora_alpha", "must be a positive number")
        if not (0.0 <= self.lora_dropout < 1.0):
            raise bad("lora_dropout", "must be in [0, 1)")
        if not self.target_modules:
            raise bad("target_modules", "must name at least one projection")
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            raise bad("learning_rate", "must be in (0, 1]")
        if not (0 <= self.warmup_steps <= 100_000):
            raise bad("warmup_steps", "must be in [0, 100000]")
        if not (1 <= self.batch_size <= 512):
            raise bad("batch_size", "must be in [1, 512]")
        if not (1 <= self.gradient_accumulation_steps <= 1024):
            raise bad("gradient_accumulation_steps", "must be in [1, 1024]")
        if not (16 <= self.max_seq_len <= 131_072):
            raise bad("max_seq_len", "must be in [16, 131072]")
        if not (math.isfinite(self.num_epochs) and 0 < self.num_epochs <= 100):
            raise bad("num_epochs", "must be in (0, 100]")
        if not (0 <= self.seed < 2**32):
            raise bad("seed", "must be in [0, 2^32)")
        if not (0 <= self.checkpoint_every_steps <= 1_000_000):
            raise bad("checkpoint_every_steps", "must be in [0, 1000000]")
        if not (0 <= self.eval_every_steps <= 1_000_000):
            raise bad("eval_every_steps", "must be in [0, 1000000]")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        """A config as ``to_dict`` wrote it, maybe by an older version (jobs are stored):
        renamed hyperparameters are read under their new names, and ones no longer known
        are left out, with a warning, rather than making the stored job unreadable."""
        known = {f.name for f in fields(cls)}
        d = {RENAMED_HYPERPARAMETERS.get(k, k): v for k, v in d.items()}
        if unknown := sorted(d.keys() - known):
            log.warning("hyperparameters no longer known, left out: %s", ", ".join(unknown))
        d = {k: v for k, v in d.items() if k in known}
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        return cls(**d)


MAX_EVAL_FRACTION = 0.5


@dataclass(frozen=True)
class EvalSplit:
    """Where a job's eval set comes from: another dataset, a carved-out share, or nowhere."""

    validation_dataset_id: str = field(
        default="", metadata={"help": "An uploaded dataset of the same format."}
    )
    fraction: float = field(
        default=0.0,
        metadata={"help": "Share of the training examples held out, chosen by the seed."},
    )

    def validate(self) -> EvalSplit:
        if self.validation_dataset_id and self.fraction:
            raise InvalidArgument(
                "eval_fraction", "give a validation_dataset_id or an eval_fraction, not both"
            )
        if self.fraction and not (
            math.isfinite(self.fraction) and 0 < self.fraction <= MAX_EVAL_FRACTION
        ):
            raise InvalidArgument(
                "eval_fraction", f"{self.fraction} is not in (0, {MAX_EVAL_FRACTION}]"
            )
        return self


@dataclass(frozen=True)
class JobSpec:
    """What the scheduler hands a training subprocess (written as ``spec.json``)."""

    job_id: str
    base_model: str = field(metadata={"help": "Served name of the base model."})
    base_model_path: str = field(metadata={"help": "Local folder or hub id to load it from."})
    dataset_path: str = field(metadata={"help": "The content-addressed dataset file."})
    job_dir: str = field(
        metadata={
            "help": "The job's folder (trainer.layout.JobFolder): rows, checkpoints (resumed "
            "from if any) and the finished adapter go there."
        }
    )
    config: JobConfig = field(default_factory=JobConfig)
    dataset_format: str = field(default="", metadata={"help": "As the upload detected it."})
    dataset_examples: int = field(default=0, metadata={"help": "Examples in the dataset."})
    eval_dataset_path: str = field(default="", metadata={"help": "A separate eval set, if any."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Share held out for eval."})
    fast_path: bool = field(
        default=True, metadata={"help": "On a GPU, train through trainer.fastpath."}
    )
    memory_budget_bytes: int = field(
        default=0,
        metadata={
            "help": "The trainer's GPU memory budget (0: none set); the fast path keeps as "
            "many layers un-checkpointed as it and the free memory hold."
        },
    )
    adapter_path: str = field(
        default="", metadata={"help": "MERGE_EXPORT: the adapter version's folder to merge."}
    )
    export_dir: str = field(
        default="", metadata={"help": "MERGE_EXPORT: where the merged model goes (not there yet)."}
    )

    @property
    def folder(self) -> JobFolder:
        return JobFolder(Path(self.job_dir))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        d = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}
        d["config"] = JobConfig.from_dict(d.get("config", {}))
        return cls(**d)


# The service's log formats (trainer.service.logs): text for people, json for machines.
LOG_FORMATS = ("text", "json")


def parse_base_models(specs: list[str]) -> dict[str, str]:
    """``NAME=PATH`` items, comma-separated or one per flag; a bare ``PATH`` is served under
    its folder's name. Later items override earlier ones of the same name."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for spec in specs for s in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        out[name] = path
    return out


@dataclass
class ServiceConfig:
    """Settings of ``python -m trainer serve``: its flags are made from these fields
    (``trainer.flags``), each with a FINETUNE_* environment fallback."""

    data_dir: Path = field(
        default=Path("data"),
        metadata={
            "help": "Shared volume: datasets, jobs, adapters, the job store.",
            "env": "FINETUNE_DATA_DIR",
        },
    )
    job_store: str = field(
        default="",
        metadata={
            "help": "The job store: empty for SQLite in DATA (one host), or a PostgreSQL "
            "URL (postgresql://USER@HOST:PORT/DB) shared by services on several hosts.",
            "env": "FINETUNE_JOB_STORE",
            "metavar": "URL",
        },
    )
    worker_id: str = field(
        default="",
        metadata={
            "help": "This service's name in the job store's claims: the same after a restart, "
            "unique among the services sharing a store (default: the host's name).",
            "env": "FINETUNE_WORKER_ID",
        },
    )
    lease_seconds: float = field(
        default=60.0,
        metadata={
            "help": "How long a claimed job stays this service's without a heartbeat (one "
            "every third of it); then another service sharing the store takes it over, from "
            "its newest checkpoint.",
            "env": "FINETUNE_LEASE_SECONDS",
        },
    )
    adapter_store: str = field(
        default="",
        metadata={
            "help": "Where published adapters live: empty for DATA/adapters (one host), or "
            "s3://BUCKET/PREFIX (endpoint from FINETUNE_S3_ENDPOINT_URL or AWS_ENDPOINT_URL, "
            "credentials as boto3 reads them); vLLM's launcher takes the same setting.",
            "env": "FINETUNE_ADAPTER_STORE",
            "metavar": "URL",
        },
    )
    job_files: str = field(
        default="",
        metadata={
            "help": "Where datasets and checkpoints are kept for every worker: empty for DATA "
            "(one host, or a volume the hosts share), or s3://BUCKET/PREFIX (endpoint and "
            "credentials as for --adapter-store), so a worker on another host trains a "
            "dataset uploaded elsewhere and resumes a job whose host died.",
            "env": "FINETUNE_JOB_FILES",
            "metavar": "URL",
        },
    )
    publish_wait_seconds: float = field(
        default=900.0,
        metadata={
            "help": "How long a finished job waits for adapter storage that does not answer "
            "(object storage down): it stays RUNNING, publishes as soon as storage is back, "
            "and fails only after this long.",
            "env": "FINETUNE_PUBLISH_WAIT_SECONDS",
        },
    )
    listen: str = field(
        default="127.0.0.1:50051",
        metadata={"help": "gRPC host:port (port 0 picks a free one).", "env": "FINETUNE_LISTEN"},
    )
    base_models: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Allow a base model: its served name and a local folder or hub id "
            "(repeatable; the variable is comma-separated).",
            "env": "FINETUNE_BASE_MODELS",
            "flag": "--base-model",
            "metavar": "NAME=PATH",
            "append": True,
            "parse": parse_base_models,
        },
    )
    vllm_url: str | None = field(
        default=None,
        metadata={
            "help": "vLLM server to hot-load adapters into; several replicas (behind a "
            "router) comma-separated, each one told of every change.",
            "env": "FINETUNE_VLLM_URL",
        },
    )
    vllm_admin_key: str | None = field(
        default=None,
        metadata={
            "help": "Admin API key for vLLM's load/unload.",
            "env": "FINETUNE_VLLM_ADMIN_KEY",
        },
    )
    tenants_file: Path | None = field(
        default=None,
        metadata={
            "help": "Tenants and key hashes (default DATA/tenants.json).",
            "env": "FINETUNE_TENANTS_FILE",
        },
    )
    tenants_store: str = field(
        default="",
        metadata={
            "help": "Where tenants and key hashes live when hosts share no volume: "
            "s3://BUCKET/PREFIX (endpoint and credentials as for --adapter-store), read by "
            "every trainer and replica and refreshed every 5 s; empty: the tenants file.",
            "env": "FINETUNE_TENANTS_STORE",
            "metavar": "URL",
        },
    )
    max_upload_bytes: int = field(
        default=1 << 30,
        metadata={"help": "Largest accepted upload.", "env": "FINETUNE_MAX_UPLOAD_BYTES"},
    )
    max_lora_rank: int = field(
        default=64,
        metadata={
            "help": "The vLLM server's --max-lora-rank; a larger rank is refused.",
            "env": "FINETUNE_MAX_LORA_RANK",
        },
    )
    devices: int | None = field(
        default=None,
        metadata={"help": "Jobs at once (default: one per GPU, or 1 on CPU)."},
    )
    gpu_memory_budget: float | None = field(
        default=None,
        metadata={
            "help": "Share of the GPU's memory the trainer may use; vLLM's "
            "--gpu-memory-utilization takes the rest. Jobs are admitted against it and "
            "spend it on speed (layers kept, not recomputed). Unset: no check, and a job "
            "plans from the memory free when it starts.",
            "env": "FINETUNE_GPU_MEMORY_BUDGET",
            "metavar": "FRACTION",
        },
    )
    min_examples: int = field(
        default=10,
        metadata={
            "help": "Fewest examples a dataset may hold.",
            "env": "FINETUNE_MIN_EXAMPLES",
        },
    )
    max_validations: int = field(
        default=2,
        metadata={
            "help": "ValidateDataset calls one tenant may run at once, each a ~400 MiB "
            "subprocess; more are refused with RESOURCE_EXHAUSTED, not queued.",
            "env": "FINETUNE_MAX_VALIDATIONS",
        },
    )
    max_queued_jobs: int = field(
        default=20,
        metadata={
            "help": "Unfinished jobs (queued or running) one tenant may have; one more is "
            "refused with RESOURCE_EXHAUSTED (0: no limit).",
            "env": "FINETUNE_MAX_QUEUED_JOBS",
        },
    )
    max_stored_bytes: int = field(
        default=100 << 30,
        metadata={
            "help": "Bytes one tenant may store (datasets, adapter versions, merged "
            "exports); an upload or job past it is refused before anything is stored "
            "(0: no limit).",
            "env": "FINETUNE_MAX_STORED_BYTES",
        },
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "Keep a job's checkpoints after its adapter is published (by default "
            "they are deleted then: the published version is what is kept).",
            "env": "FINETUNE_KEEP_CHECKPOINTS",
        },
    )
    metrics_listen: str | None = field(
        default=None,
        metadata={
            "help": "Serve Prometheus metrics at http://HOST:PORT/metrics (off unless given; "
            "9464 is the usual port; 0 picks one).",
            "env": "FINETUNE_METRICS_LISTEN",
            "metavar": "HOST:PORT",
        },
    )
    log_level: str = field(
        default="INFO", metadata={"help": "Log level.", "env": "FINETUNE_LOG_LEVEL"}
    )
    log_format: str = field(
        default="text",
        metadata={
            "help": "json: one JSON object a line, with job_id/tenant/state on job transitions.",
            "env": "FINETUNE_LOG_FORMAT",
            "choices": LOG_FORMATS,
        },
    )

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.tenants_file is None:
            self.tenants_file = Layout(self.data_dir).tenants_file
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank {self.max_lora_rank} is not one of {VLLM_LORA_RANKS}")
        if self.min_examples < 1:
            raise ValueError(f"min_examples {self.min_examples} is not at least 1")
        if self.job_store and not self.job_store.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"job_store {self.job_store!r} is not a postgresql:// URL")
        if self.lease_seconds <= 0:
            raise ValueError(f"lease_seconds {self.lease_seconds} is not positive")
        if self.publish_wait_seconds < 0:
            raise ValueError(f"publish_wait_seconds {self.publish_wait_seconds} is negative")
        if self.max_queued_jobs < 0 or self.max_stored_bytes < 0:
            raise ValueError("max_queued_jobs and max_stored_bytes are at least 0 (0: no limit)")
        if self.max_validations < 1:
            raise ValueError(f"max_validations {self.max_validations} is not at least 1")
        if self.gpu_memory_budget is not None and not 0 < self.gpu_memory_budget <= 1:
            raise ValueError(f"gpu_memory_budget {self.gpu_memory_budget} is not in (0, 1]")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format {self.log_format!r} is not one of {LOG_FORMATS}")
