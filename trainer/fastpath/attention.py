"""Packing without cross-example attention: the ``"fastpath_varlen"`` attention.

TRL packs examples into rows (``packing=True, packing_strategy="bfd"``) and flattens a batch
into one row with ``position_ids`` restarting at 0 for each example. This attention
implementation turns those positions into ``cu_seqlens`` once per forward (a backbone
pre-hook, ``add_varlen_kwargs``) and runs variable-length causal attention, so no token sees
another example: on CUDA through PyTorch's own FlashAttention-2 varlen kernels (no flash-attn
package, no hub kernel), elsewhere one causal SDPA call per example. A real workload (most
examples a few hundred tokens) then keeps the GPU as busy as full 2048-token rows.

**Equal examples.** Where every example of the batch has the same length (rows that hold
one example each: long documents cut to the sequence length) no ragged layout is needed:
one dense causal SDPA call over (examples, heads, length, dim) views (``dense_causal``),
through the first of ``DENSE_BACKENDS`` that takes the shape; in an offloaded checkpoint's
forward, cuDNN's own op, which returns the log-sum-exp the replay needs (``park_dense``;
``DENSE_PARKED``).

**Attention replay.** In an offloaded checkpoint's forward (``trainer.fastpath.checkpoint``)
each layer's attention parks its inputs, output and log-sum-exp in host memory beside the
layer input (``trainer.fastpath.parking``; 5 GiB a micro-step at 8B x 8192 tokens, over the
bus while the GPU computes); the recompute runs the attention backward on them
(``AttentionReplay``), so it skips the attention forward, the q/k/v GEMMs and RoPE's forward
(``trainer.fastpath.replay``).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.fastpath import parking

ATTN_IMPLEMENTATION = "fastpath_varlen"

# Dense causal attention, first choice first (bench/attention_kernels.py --dense); every
# backend is listed, so a shape the first ones refuse still runs.
DENSE_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
# Equal examples take ``dense_causal`` (False: varlen like any other batch, the A/B that
# ``bench/train_speed.py``'s ``-nodense`` variant measures end to end). ``DENSE_PARKED``:
# an offloaded checkpoint's forward of equal examples through ``park_dense`` too (False:
# varlen FlashAttention 2, the bench's ``-noparkdense``; run 45 on an H100, the 8 GiB plan
# on full rows: 10,853 tokens/s against 10,602, its GPU test passed).
DENSE_EQUAL = True
DENSE_PARKED = True
_CUDNN_REFUSED: set[tuple] = set()  # (q shape, k shape, dtype) cuDNN's forward refused


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Example boundaries of packed rows: a new example starts where positions don't step by 1.

    Rows are concatenated, and each row starts a new example. Returns the int32 cumulative
    lengths (``[0, len0, len0+len1, ..., total]``) and the longest example's length.
    """
    # One copy to the host (a single synchronisation) instead of a nonzero and an item().
    device = position_ids.device
    pos = position_ids.reshape(position_ids.shape[0], -1).to("cpu")
    first = pos[:, :1] - 1
    starts = torch.diff(pos, prepend=first, dim=-1) != 1
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    total = torch.tensor([pos.numel()], dtype=idx.dtype)
    cu = torch.cat([idx, total]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    cu = cu.to(device, non_blocking=True) if device.type == "cuda" else cu.to(device)
    return cu, max_len


class FlashVarlen(torch.autograd.Function):
    """FlashAttention-2 varlen through ATen's own kernels (GQA native, causal per example)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):  # type: ignore[override]
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            cu,
            cu,
            ctx.max_len,
            ctx.max_len,
            0.0,
            True,
            seed,
            offset,
            scale=ctx.scale,
        )
        return dq, dk, dv, None, None, None


def per_example_sdpa(q, k, v, cu, scale):
    """The same function on any device: one causal SDPA call per example."""
    bounds = cu.tolist()
    outs = [
        F.scaled_dot_product_attention(
            q[:, a:b].unsqueeze(0),
            k[:, a:b].unsqueeze(0),
            v[:, a:b].unsqueeze(0),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        ).squeeze(0)
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(outs, dim=1)  # (heads, total, head_dim)


def equal_examples(cu: torch.Tensor, max_len: int, tokens: int) -> int:
    """How many examples ``cu`` holds if all are ``max_len`` long, else 0 (no device sync:
    the lengths sum to ``tokens`` and none exceeds ``max_len``)."""
    n = cu.numel() - 1
    return n if n * max_len == tokens else 0


def dense_causal(query, key, value, examples: int, scale):
    """Causal attention over ``examples`` equal examples laid end to end.

    (batch, heads, seq, dim) in, (batch, seq, heads, dim) out, as ``varlen_attention_forward``.
    """
    b, h, s, d = query.shape
    q, k, v = _dense_views(query, key, value, examples)
    with sdpa_kernel(DENSE_BACKENDS, set_priority=True):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, s, h, d)


def _dense_views(query, key, value, examples: int):
    """(examples, heads, length, dim) views of (batch, heads, seq, dim) packed rows."""
    b, _, s, d = query.shape
    length = b * s // examples
    return tuple(
        t.transpose(1, 2).reshape(examples, length, t.shape[1], d).transpose(1, 2)
        for t in (query, key, value)
    )


def park_dense(current, query, key, value, examples: int, scale) -> torch.Tensor | None:
    """An offloaded checkpoint's forward of equal examples: cuDNN's causal attention,
    which also returns its log-sum-exp, so the recompute replays its backward
    (``AttentionReplay``) as FlashAttention's. Parks q, k, v and the output in the forward's
    memory order, (examples, length, heads, dim), beside the log-sum-exp. None where cuDNN
    refuses the shape (then the caller takes varlen FlashAttention)."""
    b, h, s, d = query.shape
    shapes = (query.shape, key.shape, query.dtype)
    if shapes in _CUDNN_REFUSED:
        return None
    q, k, v = _dense_views(query, key, value, examples)
    try:
        out, lse, *_, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, True, False, scale=scale
        )
    except RuntimeError:  # a head dim, dtype or card cuDNN does not take
        _CUDNN_REFUSED.add(shapes)
        return None
    parked = tuple(t.transpose(1, 2) for t in (q, k, v, out))
    current.add_replay((*parked, lse), ("cudnn", b, s, seed, offset))
    return out.transpose(1, 2).reshape(b, s, h, d)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out.

    Packed rows go through variable-length attention; anything else through causal SDPA.
    """
    b, h, s, d = query.shape
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None and attention_mask is None and kwargs.get("position_ids") is not None:
        cu, max_len = cu_seqlens_from_position_ids(kwargs["position_ids"].expand(b, -1))
    if cu is None or dropout:
        return padded_attention(query, key, value, attention_mask, dropout, scaling)
    assert max_len is not None
    flash = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if parking.replay_head() == "attention":  # a recompute: this layer's attention was parked
        parked, meta = parking.RECOMPUTE["replay"].popleft()
        out = AttentionReplay.apply(query, key, value, cu, int(max_len), scaling, meta, *parked)
        return out, None
    current = parking.LAST["current"]
    park = (
        current is not None
        and getattr(module, "_fastpath_replay", False)
        and not torch.is_grad_enabled()
    )
    examples = equal_examples(cu, int(max_len), b * s) if DENSE_EQUAL else 0
    if examples and not park:
        return dense_causal(query, key, value, examples, scaling), None
    if examples and flash and DENSE_PARKED:
        out = park_dense(current, query, key, value, examples, scaling)
        if out is not None:
            return out, None
    if flash:
        q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
        cu32 = cu.to(torch.int32)
        if park:
            out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, cu32, cu32, int(max_len), int(max_len), 0.0, True, False, scale=scaling
            )
            current.add_replay((q, k, v, out, lse), ("flash", b, s, seed, offset))
        else:
            out = FlashVarlen.apply(q, k, v, cu32, int(max_len), scaling)
        return out.view(b, s, h, d), None
    q, k, v = (t.transpose(0, 1).reshape(t.shape[1], b * s, d) for t in (query, key, value))
    out = per_example_sdpa(q, k, v, cu, scaling)
    if park:
        current.add_replay((q, k, v, out), ("sdpa", b, s, None, None))
    return out.transpose(0, 1).reshape(b, s, h, d), None


class AttentionReplay(torch.autograd.Function):
    """A recomputed layer's attention, from what its forward parked: no forward kernel.

    The forward returns the parked output; the backward runs the attention backward on the
    parked inputs, output and log-sum-exp (on the CPU, per-example SDPA recomputed from
    the parked inputs). ``query``, ``key`` and ``value`` only connect the graph: their
    values (the recompute's, never computed) are not read.
    """

    @staticmethod
    def forward(ctx, query, key, value, cu, max_len, scale, meta, *parked):  # type: ignore[override]
        kind, b, s, seed, offset = meta
        ctx.kind, ctx.b, ctx.s, ctx.seed, ctx.offset = kind, b, s, seed, offset
        ctx.max_len, ctx.scale = max_len, scale
        ctx.save_for_backward(cu, *parked)
        out = parked[3]
        h, d = query.shape[1], query.shape[3]
        if kind == "flash":
            return out.view(b, s, h, d)
        if kind == "cudnn":  # parked as (examples, length, heads, dim)
            return out.reshape(b, s, h, d)
        return out.transpose(0, 1).reshape(b, s, h, d)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        cu, *parked = ctx.saved_tensors
        b, s = ctx.b, ctx.s
        if ctx.kind == "flash":
            q, k, v, out, lse = parked
            grads = torch.ops.aten._flash_attention_backward(
                grad.reshape(b * s, *grad.shape[2:]).contiguous(),
                q,
                k,
                v,
                out,
                lse,
                cu.to(torch.int32),
                cu.to(torch.int32),
                ctx.max_len,
                ctx.max_len,
                0.0,
                True,
                ctx.seed,
                ctx.offset,
                scale=ctx.scale,
            )
            dq, dk, dv = (g.view(b, s, *g.shape[1:]).transpose(1, 2) for g in grads)
        elif ctx.kind == "cudnn":  # back to (examples, heads, length, dim) views
            *qkvo, lse = parked
            q, k, v, out = (t.transpose(1, 2) for t in qkvo)
            examples, heads, length, d = out.shape
            grad_out = grad.reshape(examples, length, heads, d).transpose(1, 2)
            grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                grad_out,
                q,
                k,
                v,
                out,
                lse,
                ctx.seed,
                ctx.offset,
                None,
                None,
                None,
                length,
                length,
                0.0,
                True,
                scale=ctx.scale,
            )
            dq, dk, dv = (
                g.transpose(1, 2).reshape(b, s, g.shape[1], d).transpose(1, 2) for g in grads
            )
        else:
            q, k, v, _ = (t.detach().requires_grad_(True) for t in parked)
            with torch.enable_grad():
                out = per_example_sdpa(q, k, v, cu, ctx.scale)
            grad_out = grad.reshape(b * s, *grad.shape[2:]).transpose(0, 1)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            dq, dk, dv = (g.reshape(g.shape[0], b, s, g.shape[2]).transpose(0, 1) for g in grads)
        return (dq, dk, dv, None, None, None, None) + (None,) * len(parked)


def padded_attention(q, k, v, attention_mask, dropout, scale):
    """Unpacked batches (evaluation, generation): causal SDPA with the 2-D padding mask."""
    s = q.shape[2]
    mask = None
    if attention_mask is not None and attention_mask.dim() == 2:
        causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        mask = causal & attention_mask[:, None, None, -s:].bool()
        mask |= torch.eye(s, dtype=torch.bool, device=q.device)  # no all-masked rows (left padding)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=mask is None and s > 1,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make ``"fastpath_varlen"`` a transformers attention implementation; return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    # Like FlashAttention: no 4-D mask, only the 2-D padding mask when there is padding.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    return ATTN_IMPLEMENTATION


def add_varlen_kwargs(module, args, kwargs):
    """Backbone pre-hook: compute ``cu_seqlens`` once per forward, not once per layer."""
    pos = kwargs.get("position_ids")
    if (
        pos is None
        or kwargs.get("attention_mask") is not None
        or kwargs.get("cu_seq_lens_q") is not None
        or kwargs.get("past_key_values") is not None
        or module.config._attn_implementation != ATTN_IMPLEMENTATION
    ):
        return None
    first = kwargs.get("input_ids")
    if first is None:
        first = kwargs.get("inputs_embeds")
    if first is not None:
        pos = pos.expand(first.shape[0], -1)  # positions may come unsqueezed, not expanded
    cu, max_len = cu_seqlens_from_position_ids(pos)
    kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    return args, kwargs
