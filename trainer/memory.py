"""GPU memory a training job needs, and whether it fits in the share vLLM leaves.

One GPU is shared by vLLM (``--gpu-memory-utilization``) and the trainer (its budget,
a fraction of the card). A job that cannot fit is refused when it is created
(FAILED_PRECONDITION) instead of dying of an OOM halfway, and the worker checks the
memory actually free before it loads the model.

The estimate is arithmetic on the base model's ``config.json`` (no weights are read),
calibrated on an H200 against measured peaks at Llama 3.1 8B shape, r=64, batch 4 x
2048 tokens (bench/README.md, runs 12 and 24): the fast path 7.26 GiB measured, 7.46
estimated; the reference recipe 15.78 / 15.94 GiB measured (full rows / the mix), 15.64
estimated.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from trainer.config import JobConfig
from trainer.errors import FailedPrecondition

GIB = 1 << 30
# NF4 stores 4 bits a weight; double quantisation adds about 0.127 bits (one fp8
# constant per 64 weights, one fp32 per 256 of those).
NF4_BYTES_PER_PARAM = (4 + 0.127) / 8
# LoRA weights and their gradients in fp32 (4 + 4) plus 8-bit AdamW's two states (1 + 1).
LORA_BYTES_PER_PARAM = 10
# CUDA context, cuBLAS workspaces and allocator slack. 256 MiB until run 46, whose Qwen 2.5
# 7B plan at 8 GiB (one layer kept) peaked at 7.24 GiB against an estimate of 7.22; with
# 384 the estimate is 0.10-0.65 GiB above every peak run 46 measured on three shapes at 8
# and 40 GiB (tests/test_memory.py holds them).
OVERHEAD_BYTES = 3 * GIB // 8


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama/Mistral/Qwen-style decoder that decide its memory."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict) -> ModelShape:
        heads = cfg["num_attention_heads"]
        return cls(
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            intermediate=cfg["intermediate_size"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelShape | None:
        """The shape of a local model folder; None for a hub id or an unreadable config."""
        try:
            return cls.from_config(json.loads((Path(folder) / "config.json").read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each of the seven projections of one layer."""
        h, i = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }


def kept_layer_bytes(shape: ModelShape, cfg: JobConfig) -> int:
    """GPU bytes one decoder layer's activations hold from its forward to its backward on
    the fast path when the layer is kept, not checkpointed (``FastPathConfig.kept_layers``).

    Per token, in bf16: the inputs of both norms, q and the attention output, k and v, the
    MLP's gate and up and its product (the down projection's input), the LoRA input of the
    q/k/v and gate/up projections (once each: the fast path's LoRA node keeps the undropped
    input and draws its dropout again in the backward), RoPE's cos and sin, and each
    projection's rank-wide LoRA term. Measured on the H200 (run 39, Llama 3.1 8B shape, 32
    layers kept): dropout 0 peaked 39.84 GiB, dropout 0.05 with stored dropped copies 47.84.
    """
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    q = shape.heads * shape.head_dim
    per_token = 2 * h + 2 * q + h + h + 2 * kv + 3 * shape.intermediate + 2 * shape.head_dim
    per_token += len(cfg.target_modules) * cfg.lora_rank
    return per_token * 2 * cfg.batch_size * cfg.max_seq_len


def _static_and_working(shape: ModelShape, cfg: JobConfig, fast_path: bool) -> tuple[int, int]:
    """The bytes a job holds throughout (weights, LoRA state, tables, checkpoints, overhead)
    and one checkpointed layer's recompute and backward working set."""
    proj = shape.projections()
    linear = shape.layers * sum(i * o for i, o in proj.values())
    lora = shape.layers * sum(
        cfg.lora_rank * (i + o) for m, (i, o) in proj.items() if m in cfg.target_modules
    )
    table = shape.vocab * shape.hidden
    tokens = cfg.batch_size * cfg.max_seq_len  # a micro-batch: padded rows, or packed ones
    if fast_path:
        # bf16 LM head on the GPU (the input embeddings stay in host memory), bf16
        # activations, checkpointed layer inputs offloaded to the host.
        tables = table * 2
        act_bytes, checkpoints = 2, 0
    else:
        # prepare_model_for_kbit_training casts embeddings, head and norms to fp32, and
        # with them the residual stream that checkpointing keeps for every layer.
        tables = (1 if shape.tied_embeddings else 2) * table * 4
        act_bytes, checkpoints = 4, shape.layers * tokens * shape.hidden * 4
    # One layer's recompute and backward working set: the MLP's three intermediate-wide
    # tensors and about ten hidden-wide ones (attention, norms, LoRA inputs, gradients).
    # The fast path keeps five: its LoRA dropout masks are drawn again in the backward,
    # never stored, and its LoRA terms are added in place.
    working = tokens * (3 * shape.intermediate + (5 if fast_path else 10) * shape.hidden)
    working *= act_bytes
    if fast_path:
        # Attention and residual replay: one layer's attention inputs and output and its
        # residual after the attention come back from the host for its recompute (q, o
        # and the residual hidden-wide, k and v kv-wide).
        working += tokens * (3 * shape.hidden + 2 * shape.kv_heads * shape.head_dim) * act_bytes
    static = (
        linear * NF4_BYTES_PER_PARAM
        + tables
        + lora * LORA_BYTES_PER_PARAM
        + checkpoints
        + OVERHEAD_BYTES
    )
    return int(static), working


def estimate_bytes(
    shape: ModelShape, cfg: JobConfig, *, fast_path: bool = True, kept_layers: int = 0
) -> int:
    """Peak GPU bytes of one job of the QLoRA recipe (the fast path, or the reference one);
    on the fast path, with its last ``kept_layers`` decoder layers not checkpointed.

    The kept layers are the last ones, so the backward frees their activations before it
    reaches the first checkpointed layer: the kept activations and a recompute's working
    set are never held together, and the peak is the larger of the two over what the job
    holds throughout. Adding them instead put the estimate 0.52-0.60 GiB above the working
    set (1.19 GiB at Llama's shape) over every peak measured on the present code with
    layers kept (bench/README.md: Llama 3.1 8B with 30 of 32 kept, runs 40 and 45, and
    all 32, run 42; Mistral 7B 31 of 32, run 41; Qwen 2.5 7B 26 of 28, run 45, 0.34 above
    its 1.32); so this estimate stays 0.34-0.60 GiB above those peaks, and 0.07 above the
    all-checkpointed one (runs 28-45). So a layer whose activations fit in the working set
    is kept at no cost in the estimate.
    """
    static, working = _static_and_working(shape, cfg, fast_path)
    if not fast_path:
        return static + working
    return static + max(working, kept_layer_bytes(shape, cfg) * min(kept_layers, shape.layers))


def kept_layers_for_budget(shape: ModelShape, cfg: JobConfig, budget_bytes: float) -> int:
    """How many decoder layers the fast path can keep (not checkpoint) within
    ``budget_bytes``: the most whose estimate fits, 0 where even the all-checkpointed
    job does not."""
    static, working = _static_and_working(shape, cfg, fast_path=True)
    if static + working > budget_bytes:
        return 0
    return min(shape.layers, int((budget_bytes - static) // kept_layer_bytes(shape, cfg)))


def plan_kept_layers(
    shape: ModelShape, cfg: JobConfig, *, budget_bytes: int, free_bytes: int
) -> int:
    """The fast path's plan for one job: how many decoder layers keep their activations,
    so that the job runs as fast as its memory allows and its estimate stays within both
    its budget (``budget_bytes``; 0 when the service has none) and the GPU memory free when
    it starts, less a margin for the allocator's cache (the reserved bytes ran up to 1.2 GiB
    above the allocated peak on the H200, bench/README.md runs 36 and 37)."""
    usable = free_bytes - max(GIB, free_bytes // 20)
    if budget_bytes > 0:
        usable = min(usable, budget_bytes)
    return kept_layers_for_budget(shape, cfg, usable)


@dataclass(frozen=True)
class GpuMemory:
    """One GPU's memory as the driver reports it, in bytes."""

    total: int
    used: int  # every process's allocations, vLLM's too; the driver's reserve excluded


def gpu_memory() -> dict[int, GpuMemory]:
    """Memory of each GPU by NVML index (``nvidia-smi``'s index), or {} without a driver.

    Read through NVML (``pynvml``, from nvidia-ml-py), the library ``nvidia-smi`` itself
    calls: no subprocess, no CSV, and no CUDA context in this process. Like ``nvidia-smi``,
    NVML sees every GPU of the host whatever ``CUDA_VISIBLE_DEVICES`` says, and so does the
    service: its job slots are device numbers from 0 (``trainer.service.runner``). ``used``
    is what ``nvidia-smi`` calls used (NVML's v2 figure, without the memory the driver
    reserves for itself), the v1 figure where the driver has no v2.
    """
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py not installed: no way to ask
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, or no GPU
        return {}
    try:
        found = {}
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
            except pynvml.NVMLError:  # a driver without the v2 call
                info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            found[index] = GpuMemory(total=int(info.total), used=int(info.used))
        return found
    except pynvml.NVMLError:
        return {}
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def gpu_total_bytes() -> int | None:
    """Memory of GPU 0 (no CUDA context in this process); None without a GPU."""
    gpu = gpu_memory().get(0)
    return gpu.total if gpu is not None else None


def check_budget(
    shape: ModelShape | None,
    cfg: JobConfig,
    budget_fraction: float | None,
    total_bytes: int | None,
    *,
    fast_path: bool = True,
) -> int | None:
    """Refuse a job whose estimate exceeds the trainer's share of the GPU; return the estimate.

    Nothing is checked without a budget, a GPU or a readable model config (a hub id).
    """
    if shape is None:
        return None
    need = estimate_bytes(shape, cfg, fast_path=fast_path)
    if budget_fraction is None or total_bytes is None:
        return need
    allowed = budget_fraction * total_bytes
    if need > allowed:
        raise FailedPrecondition(
            f"hyperparameters: this job needs about {need / GIB:.1f} GiB of GPU memory but the "
            f"trainer's budget is {allowed / GIB:.1f} GiB ({budget_fraction:.2f} of "
            f"{total_bytes / GIB:.0f} GiB; vLLM holds the rest). Lower batch_size, "
            f"max_seq_len or lora_rank, or raise FINETUNE_GPU_MEMORY_BUDGET."
        )
    return need


@dataclass(frozen=True)
class MemoryBudget:
    """The trainer's share of one GPU, checked when a job is created."""

    fraction: float
    total_bytes: int

    @classmethod
    def detect(cls, fraction: float | None) -> MemoryBudget | None:
        """The budget on this host's GPU; None without a budget or a GPU."""
        total = gpu_total_bytes() if fraction is not None else None
        return cls(fraction, total) if fraction is not None and total is not None else None

    @property
    def bytes(self) -> int:
        return int(self.fraction * self.total_bytes)

    def check(self, base_model_path: str, cfg: JobConfig) -> int | None:
        shape = ModelShape.from_folder(base_model_path)
        return check_budget(shape, cfg, self.fraction, self.total_bytes)
