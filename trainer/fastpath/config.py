"""Which speed-ups the fast path applies (``FastPathConfig``), and what it asks of the Trainer.

**No needless host waits.** ``cu_seqlens`` costs one small copy to the host per forward; the
Trainer's NaN filter of the logged loss (a host read after every micro-step, which drains the
GPU queue) is off, batches reach the GPU by non-blocking copies from pinned memory, and the
trained tokens are counted on the host (``HostTokenCount``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainerCallback


@dataclass
class FastPathConfig:
    """Which speed-ups ``prepare_model`` and ``fuse_lora`` apply."""

    varlen_attention: bool = field(
        default=True, metadata={"help": "Packed rows attend within each example only."}
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute each decoder layer in the backward."}
    )
    offload_checkpoints: bool = field(
        default=True, metadata={"help": "Keep the checkpointed layer inputs in host memory."}
    )
    kept_layers: int = field(
        default=0,
        metadata={
            "help": "The last this many decoder layers keep their activations for the "
            "backward instead of being checkpointed: no recompute and no parking for them, "
            "for about 1.07 GiB a layer at 8B x 8192 tokens "
            "(``trainer.memory.kept_layers_for_budget`` picks how many a budget holds)."
        },
    )
    fused_lora: bool = field(
        default=True, metadata={"help": "Add the LoRA term with one addmm (no clone/scale/add)."}
    )
    host_embeddings: bool = field(
        default=True,
        metadata={"help": "Keep the frozen input-embedding table in host memory (-1 GiB at 8B)."},
    )
    compile_elementwise: bool = field(
        default=True,
        metadata={"help": "On CUDA, fuse RMSNorm, RoPE and SiLU*up with torch.compile."},
    )
    lean_recompute: bool = field(
        default=True,
        metadata={
            "help": "In a layer's recompute, skip the down projection's GEMM (its output "
            "only feeds the layer output, which the backward never reads)."
        },
    )
    replay_attention: bool = field(
        default=True,
        metadata={
            "help": "Park each layer's attention inputs, output and log-sum-exp in host "
            "memory with its checkpoint: the recompute skips the q/k/v GEMMs and the "
            "attention forward."
        },
    )
    replay_residual: bool = field(
        default=True,
        metadata={
            "help": "Park the residual stream after each layer's attention with its "
            "checkpoint: the recompute skips the output projection's GEMM."
        },
    )
    sync_free_steps: bool = field(
        default=True,
        metadata={
            "help": "Skip the Trainer's NaN/inf filter of the logged loss (it reads the loss "
            "on the host after every micro-step) and copy batches to the GPU without "
            "blocking: either would stall the GPU queue."
        },
    )

    flat_optimizer: bool = field(
        default=True,
        metadata={
            "help": "Step the 8-bit optimizer on the LoRA weights packed into one buffer: "
            "one kernel and one device wait a step, not one per weight (448 at 8B; "
            "bitsandbytes synchronises after each). The same numbers (trainer.fastpath.flatparams)."
        },
    )

    def optimizer(self, args: Any) -> tuple[Any, dict[str, Any]] | None:
        """``Trainer(optimizer_cls_and_kwargs=...)`` for ``args``; None keeps the Trainer's."""
        import bitsandbytes as bnb
        from transformers import Trainer

        from trainer.fastpath.flatparams import flat_optimizer

        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        eight_bit = isinstance(cls, type) and issubclass(cls, bnb.optim.optimizer.Optimizer8bit)
        if not self.flat_optimizer or not eight_bit or kwargs.get("optim_bits") != 8:
            return None
        return flat_optimizer(cls), kwargs

    def sft_args(self) -> dict[str, Any]:
        """``SFTConfig`` arguments this configuration needs (the recipe merges them in)."""
        args: dict[str, Any] = {}
        if self.varlen_attention:
            args.update(packing=True, packing_strategy="bfd", padding_free=True)
        # Checkpointing is installed by ``prepare_model``; the Trainer must not replace it.
        args["gradient_checkpointing"] = False
        if self.sync_free_steps:
            args["logging_nan_inf_filter"] = False
            # Batches go to the GPU from pinned memory without a blocking copy (3 stalls
            # of the GPU queue at every micro-step's start otherwise).
            args["accelerator_config"] = {"non_blocking": True}
            if self._host_token_count:
                # Counted on the host instead (``HostTokenCount``, from ``callbacks``).
                args["include_num_input_tokens_seen"] = "no"
        return args

    def callbacks(self, model: torch.nn.Module) -> list[Any]:
        """Trainer callbacks this configuration needs, on the model the Trainer trains."""
        return [HostTokenCount(model)] if self._host_token_count else []

    @property
    def _host_token_count(self) -> bool:
        # Only packed padding-free rows are all real tokens, so that their shape counts them.
        return self.sync_free_steps and self.varlen_attention


class HostTokenCount(TrainerCallback):
    """The Trainer's ``num_input_tokens_seen``, counted on the host.

    The Trainer's own count sums each micro-batch on the GPU and reads the sum back once
    the backward is queued, so the host waits for the GPU to drain at every micro-step.
    Packed padding-free rows hold no padding: a micro-batch's tokens are its shape. Only
    training forwards count (evaluation runs without gradients). The checkpoint keeps the
    total, as it keeps the Trainer's own.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.pending = 0
        self.hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and module.training and torch.is_grad_enabled():
            self.pending += ids.numel()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        state.num_input_tokens_seen += self.pending
        self.pending = 0

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.hook.remove()
