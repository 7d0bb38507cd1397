"""Offloaded checkpoints: recompute each decoder layer in the backward, its input parked.

Each decoder layer is recomputed in the backward (as with gradient checkpointing) and its
input is parked in pinned host memory in between (``trainer.fastpath.parking``).

**Lean recompute.** A Llama-style layer ends in ``residual + down_proj(...)``; when the
backward recomputes the layer, that output's value is never read, so the down projection's
GEMM (a quarter of the layer's) is skipped there (``RECOMPUTE["on"]``, read by the LoRA
layers, ``trainer.fastpath.lora``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from trainer.fastpath import parking


class OffloadedCheckpoint(torch.autograd.Function):
    """Run a layer without keeping its graph; park its input; recompute it in the backward."""

    @staticmethod
    def forward(ctx, run, x):  # type: ignore[override]
        dev = x.device.type
        ctx.run = run
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.rng_cpu = torch.get_rng_state()
        ctx.rng_dev = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.parked = parking.Parked(x, parking.LAST["parked"])
        parking.LAST["parked"] = parking.LAST["current"] = ctx.parked
        try:
            return run(x)
        finally:
            parking.LAST["current"] = None

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, replays = ctx.parked.take()
        x = x.detach().requires_grad_(True)
        ctx.parked = None
        dev = x.device
        devices = [dev.index] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=dev.type):
            torch.set_rng_state(ctx.rng_cpu)
            if ctx.rng_dev is not None:
                torch.cuda.set_rng_state(ctx.rng_dev, dev)
            enabled, dtype = ctx.autocast
            parking.RECOMPUTE["on"] = True  # the layer's output value itself goes unused now
            parking.RECOMPUTE["replay"] = replays
            try:
                with torch.enable_grad(), torch.autocast(dev.type, dtype=dtype, enabled=enabled):
                    out = ctx.run(x)
            finally:
                parking.RECOMPUTE["on"], parking.RECOMPUTE["replay"] = False, None
            if replays:
                raise RuntimeError(f"a parked {parking.replay_kind(replays[0])} was not replayed")
        torch.autograd.backward(out, grad)
        return None, x.grad


def offloaded_checkpoint(run, hidden_states, *args, **kwargs):
    """A ``_gradient_checkpointing_func`` for transformers' ``GradientCheckpointingLayer``."""
    if args or kwargs or not torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(
            run, hidden_states, *args, use_reentrant=False, **kwargs
        )
    return OffloadedCheckpoint.apply(run, hidden_states)


def install_checkpointing(model, offload: bool, kept_layers: int = 0) -> None:
    """Checkpoint every decoder layer but the last ``kept_layers`` (those keep their
    activations for the backward: the memory a budget allows, spent on no recompute)."""
    func = offloaded_checkpoint if offload else non_reentrant_checkpoint
    original = model.gradient_checkpointing_enable

    def gradient_checkpointing_enable(gradient_checkpointing_kwargs=None, **_: Any) -> None:
        # Whoever enables checkpointing later (a Trainer) gets this function, not the default.
        original(gradient_checkpointing_kwargs={"use_reentrant": False})
        for module in model.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = func
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for layer in layers[len(layers) - kept_layers :] if kept_layers > 0 else []:
            layer.gradient_checkpointing = False
        if offload:
            model.enable_input_require_grads()  # the parked input is what carries the gradient

    model.gradient_checkpointing_enable = gradient_checkpointing_enable
    gradient_checkpointing_enable()


def non_reentrant_checkpoint(run, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
