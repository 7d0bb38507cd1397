"""Fused elementwise ops (CUDA): RMSNorm, RoPE, the SiLU gate, and two backward pieces.

RMSNorm, RoPE and the SiLU gate run eagerly as chains of small kernels, RMSNorm in fp32 with
copies in and out; ``torch.compile`` of the same formulas makes each one kernel forward and
one backward. ``compile_elementwise`` compiles them once into ``COMPILED``, with the masked
add of a dropout backward (``add_dropout_grad``, used by ``trainer.fastpath.lora``) and the
RoPE gradient a replayed layer's recompute takes (``rope_grad``, ``trainer.fastpath.replay``).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch
import torch.nn.functional as F


def rope_grad(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient through ``x * cos + rotate_half(x) * sin``: the inverse rotation."""
    u = grad * sin
    half = u.shape[-1] // 2
    return grad * cos + torch.cat((u[..., half:], -u[..., :half]), dim=-1)


def masked_add(acc: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, scale: float):
    """``acc += grad * mask * scale``: a dropout backward added into an input gradient."""
    return acc.add_(grad * mask * scale)


def add_dropout_grad(acc, grad, mask, scale: float) -> torch.Tensor:
    """``acc += grad * mask * scale``, compiled into one kernel on CUDA: there ``addcmul_``
    with a bool mask takes a slow dtype-casting kernel (2.5x the bytes' time)."""
    compiled = COMPILED.get("masked_add") if acc.is_cuda else None
    if compiled is not None:
        try:
            return compiled(acc, grad, mask, scale)
        except Exception:  # a compiler failure costs speed, never the job
            COMPILED.pop("masked_add", None)
    return acc.addcmul_(grad, mask, value=scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` as a function of tensors, for one compiled graph."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    return COMPILED["rms"](x, self.weight, self.variance_epsilon)


def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(COMPILED["silu_mul"](self.gate_proj(x), self.up_proj(x)))


COMPILED: dict[str, Any] = {}


def compile_elementwise(model) -> None:
    """Give RMSNorm and SiLU-gated MLP modules, and the model's RoPE, compiled kernels.

    The formulas are transformers' own (Llama, Mistral, Qwen2 share them); dynamic shapes,
    so packed batches of any length reuse one graph. The originals stay reachable as
    ``_fastpath_eager_forward`` and ``_fastpath_eager_rope``.
    """
    if not COMPILED:
        COMPILED["rms"] = torch.compile(rms_norm, dynamic=True)
        COMPILED["silu_mul"] = torch.compile(silu_mul, dynamic=True)
        COMPILED["masked_add"] = torch.compile(masked_add, dynamic=True)
        COMPILED["rope_grad"] = torch.compile(rope_grad, dynamic=True)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module._fastpath_eager_forward = module.forward
            module.forward = types.MethodType(norm_forward, module)
        elif (
            all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj"))
            and getattr(getattr(module, "config", None), "hidden_act", None) == "silu"
        ):
            module._fastpath_eager_forward = module.forward
            module.forward = types.MethodType(mlp_forward, module)
    modeling: Any = sys.modules[type(model).__module__]
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is not None and not hasattr(modeling, "_fastpath_eager_rope"):
        replay_aware = getattr(rope, "_fastpath_rope_replay", False)
        eager = modeling._fastpath_rope if replay_aware else rope
        modeling._fastpath_eager_rope = eager
        modeling._fastpath_compiled_rope = torch.compile(eager, dynamic=True)
        if replay_aware:  # ``install_rope_replay``'s function stays in front
            modeling._fastpath_rope = modeling._fastpath_compiled_rope
        else:
            modeling.apply_rotary_pos_emb = modeling._fastpath_compiled_rope
