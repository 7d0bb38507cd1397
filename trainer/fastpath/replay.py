"""RoPE and residual replays: what a recomputed layer reads from its parked tensors.

* **RoPE.** A replayed attention (``trainer.fastpath.attention``) reads the parked q and k,
  so the recompute never rotates them; ``RopeReplay`` stands in for the model's
  ``apply_rotary_pos_emb`` there and its backward rotates the gradients back
  (``elementwise.rope_grad``, the inverse rotation).
* **Residual.** The residual stream after each layer's attention (what the MLP's norm reads)
  is parked too, 64 MiB a layer at 8B x 8192 tokens; the recompute hands the norm that value,
  so the output projection's GEMM is skipped as well (its output only feeds the sum the parked
  value stands for).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from trainer.fastpath import elementwise, parking


class RopeReplay(torch.autograd.Function):
    """RoPE in a replayed layer's recompute: the attention reads the parked q and k, so
    the rotated ones are never computed; the backward rotates their gradients back."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):  # type: ignore[override]
        ctx.save_for_backward(cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))
        return torch.empty_like(q), torch.empty_like(k)

    @staticmethod
    def backward(ctx, grad_q, grad_k):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        grad = (
            elementwise.COMPILED.get("rope_grad", elementwise.rope_grad)
            if grad_q.is_cuda
            else elementwise.rope_grad
        )
        return grad(grad_q, cos, sin), grad(grad_k, cos, sin), None, None, None


def install_rope_replay(model) -> None:
    """Route the model's ``apply_rotary_pos_emb`` through ``RopeReplay`` while a replayed
    layer is recomputed (whatever it is otherwise: eager or compiled)."""
    modeling: Any = sys.modules[type(model).__module__]
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is None or getattr(rope, "_fastpath_rope_replay", False):
        return

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if parking.replay_head() == "attention" and not (cos.requires_grad or sin.requires_grad):
            return RopeReplay.apply(q, k, cos, sin, unsqueeze_dim)
        return modeling._fastpath_rope(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._fastpath_rope_replay = True  # type: ignore[attr-defined]
    modeling._fastpath_rope = rope
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


class ResidualReplay(torch.autograd.Function):
    """The residual stream after a recomputed layer's attention, as its forward parked it.

    The recompute skips the output projection's GEMM, so the sum it feeds holds no real
    value; the MLP's norm reads the parked one instead, and the sum's gradient is the
    norm input's gradient, unchanged.
    """

    @staticmethod
    def forward(ctx, x, parked):  # type: ignore[override]
        return parked.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def replay_residual(norm: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a layer's MLP norm (``_fastpath_replay`` on): in an offloaded
    checkpoint's forward, park its input (the residual stream after the attention); in
    the recompute, hand the norm that parked value in place of the recomputed sum."""
    if parking.replay_head() == "residual":
        (parked,), _ = parking.RECOMPUTE["replay"].popleft()
        return (ResidualReplay.apply(args[0], parked), *args[1:])
    current = parking.LAST["current"]
    if current is not None and norm._fastpath_replay and not torch.is_grad_enabled():
        current.add_replay((args[0],), ("residual",))
    return None
