"""Packed (varlen) causal attention on the GPU: PyTorch's FlashAttention 2 against cuDNN.

The fast path runs every layer's attention on packed rows through ATen's
``_flash_attention_forward``/``_backward`` with ``cu_seqlens`` (trainer.fastpath.attention).
ATen also reaches cuDNN's fused attention with the same ragged layout
(``_cudnn_attention_forward`` with ``cum_seq_q``/``cum_seq_k``). This script times both,
forward and backward, on the reference shapes (8192 tokens a micro-batch: batch 4 x 2048),
for full rows and for a mix of example lengths, and checks cuDNN's output and gradients
against FlashAttention's. It prints one line per case and the ratio FA2 / cuDNN.

Rows that hold one example each (full rows) need no ragged layout at all: ``--dense`` times
dense causal SDPA on them, (rows, heads, 2048, dim) views of the same packed tensors, through
each backend PyTorch has (its own choice, cuDNN, FlashAttention 2; GQA native, and cuDNN
with K and V repeated to every head), forward and backward through autograd, each checked
against the varlen FlashAttention 2 the fast path runs.

    python3 bench/attention_kernels.py [--dense] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # heads, kv heads, head dim
    "llama-3.1-8b": (32, 8, 128),
    "qwen2.5-7b": (28, 4, 128),
}


def lengths(kind: str, rows: int, seq: int, seed: int = 0) -> list[int]:
    """Example lengths packed into ``rows`` rows of ``seq`` tokens."""
    if kind == "full":
        return [seq] * rows
    rng = random.Random(seed)
    out: list[int] = []
    for _ in range(rows):
        left = seq
        while left > 0:
            n = min(left, max(16, int(rng.lognormvariate(5.5, 0.8))))
            out.append(n)
            left -= n
    return out


def flash(q, k, v, cu, max_len, scale):
    out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
    )
    return out, (lse, seed, offset)


def flash_bwd(g, q, k, v, out, saved, cu, max_len, scale):
    lse, seed, offset = saved
    return torch.ops.aten._flash_attention_backward(
        g, q, k, v, out, lse, cu, cu, max_len, max_len, 0.0, True, seed, offset, scale=scale
    )


def cudnn(q, k, v, cu, max_len, scale):
    res = torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu, cu, max_len, max_len, True, 0.0, True, False, scale=scale
    )
    return res[0], (res[1], res[6], res[7])


def cudnn_bwd(g, q, k, v, out, saved, cu, max_len, scale):
    lse, seed, offset = saved
    return torch.ops.aten._cudnn_attention_backward(
        g, q, k, v, out, lse, seed, offset, None, cu, cu, max_len, max_len, 0.0, True,
        scale=scale,
    )  # fmt: skip


def timed(fn, reps: int) -> float:
    """Milliseconds a call, by CUDA events over ``reps`` calls after two warm-ups."""
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def case(shape: str, kind: str, reps: int) -> dict:
    heads, kv, d = SHAPES[shape]
    lens = lengths(kind, 4, 2048)
    total = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    max_len, scale = max(lens), d**-0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
               for h in (heads, kv, kv))  # fmt: skip
    g = torch.randn(total, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    row: dict = {"shape": shape, "rows": kind, "examples": len(lens), "tokens": total}
    ref_out, ref_saved = flash(q, k, v, cu, max_len, scale)
    ref_grads = flash_bwd(g, q, k, v, ref_out, ref_saved, cu, max_len, scale)
    row["fa2_fwd_ms"] = timed(lambda: flash(q, k, v, cu, max_len, scale), reps)
    row["fa2_bwd_ms"] = timed(
        lambda: flash_bwd(g, q, k, v, ref_out, ref_saved, cu, max_len, scale), reps
    )
    try:
        out, saved = cudnn(q, k, v, cu, max_len, scale)
        grads = cudnn_bwd(g, q, k, v, out, saved, cu, max_len, scale)
    except Exception as e:  # not in this build, or not for this layout: say so
        row["cudnn_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    row["out_max_diff"] = (out.float() - ref_out.float()).abs().max().item()
    row["grad_max_diff"] = max(
        (a.float() - b.float()).abs().max().item() for a, b in zip(grads, ref_grads, strict=True)
    )
    row["grad_scale"] = max(b.float().abs().max().item() for b in ref_grads)
    row["cudnn_fwd_ms"] = timed(lambda: cudnn(q, k, v, cu, max_len, scale), reps)
    row["cudnn_bwd_ms"] = timed(lambda: cudnn_bwd(g, q, k, v, out, saved, cu, max_len, scale), reps)
    fa2 = row["fa2_fwd_ms"] + row["fa2_bwd_ms"]
    row["fa2_over_cudnn"] = fa2 / (row["cudnn_fwd_ms"] + row["cudnn_bwd_ms"])
    return row


def dense(q, k, v, rows, scale, backend, repeat):
    """Causal SDPA on ``rows`` equal examples; packed (tokens, heads, dim) in and out."""
    heads, seq = q.shape[1], q.shape[0] // rows
    qd, kd, vd = (t.view(rows, seq, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
    if repeat:
        kd, vd = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (kd, vd))
    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(
            qd, kd, vd, is_causal=True, scale=scale, enable_gqa=not repeat
        )
    return out.transpose(1, 2).reshape(q.shape)


DENSE = {  # name: (backend, K/V repeated to every head)
    "sdpa_default": (None, False),
    "sdpa_cudnn": (SDPBackend.CUDNN_ATTENTION, False),
    "sdpa_cudnn_repeat": (SDPBackend.CUDNN_ATTENTION, True),
    "sdpa_flash": (SDPBackend.FLASH_ATTENTION, False),
    "sdpa_efficient": (SDPBackend.EFFICIENT_ATTENTION, False),
}


def dense_case(shape: str, reps: int) -> dict:
    """Full rows: varlen FA2 (forward and backward through FlashVarlen's two calls) against
    dense SDPA through autograd, each backend checked against FA2's output and gradients."""
    heads, kv, d = SHAPES[shape]
    rows, seq = 4, 2048
    total = rows * seq
    cu = torch.arange(0, total + 1, seq, dtype=torch.int32, device="cuda")
    scale = d**-0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16, generator=gen)
               for h in (heads, kv, kv))  # fmt: skip
    g = torch.randn(total, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    row: dict = {"shape": shape, "rows": "full-dense", "examples": rows, "tokens": total}
    ref_out, ref_saved = flash(q, k, v, cu, seq, scale)
    ref_grads = flash_bwd(g, q, k, v, ref_out, ref_saved, cu, seq, scale)
    row["fa2_fwd_ms"] = timed(lambda: flash(q, k, v, cu, seq, scale), reps)
    row["fa2_bwd_ms"] = timed(
        lambda: flash_bwd(g, q, k, v, ref_out, ref_saved, cu, seq, scale), reps
    )
    row["grad_scale"] = max(b.float().abs().max().item() for b in ref_grads)
    fa2 = row["fa2_fwd_ms"] + row["fa2_bwd_ms"]
    try:
        views = (t.view(rows, seq, t.shape[1], d).transpose(1, 2) for t in (q, k, v))
        row["default_choice"] = int(
            torch._fused_sdp_choice(*views, is_causal=True, enable_gqa=True)
        )
    except Exception as e:
        row["default_choice"] = f"{type(e).__name__}: {str(e)[:120]}"
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    for name, (backend, repeat) in DENSE.items():
        try:
            out = dense(qg, kg, vg, rows, scale, backend, repeat)
            grads = torch.autograd.grad(out, (qg, kg, vg), g, retain_graph=True)
        except Exception as e:  # this backend refuses the shape or the flags: say so
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        row[f"{name}_out_max_diff"] = (out.float() - ref_out.float()).abs().max().item()
        row[f"{name}_grad_max_diff"] = max(
            (a.float() - b.float()).abs().max().item()
            for a, b in zip(grads, ref_grads, strict=True)
        )

        def forward(backend=backend, repeat=repeat):
            return dense(qg, kg, vg, rows, scale, backend, repeat)

        def backward(out=out):
            return torch.autograd.grad(out, (qg, kg, vg), g, retain_graph=True)

        row[f"{name}_fwd_ms"] = timed(forward, reps)
        bwd = timed(backward, reps)
        row[f"{name}_bwd_ms"] = bwd
        row[f"fa2_over_{name}"] = fa2 / (row[f"{name}_fwd_ms"] + bwd)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="append one JSON object a case to this file")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dense", action="store_true", help="full rows, dense SDPA backends only")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"{torch.cuda.get_device_name()}")  # fmt: skip
    for shape in SHAPES:
        for kind in ("full-dense",) if args.dense else ("full", "mix"):
            row = dense_case(shape, args.reps) if args.dense else case(shape, kind, args.reps)
            print(json.dumps(row), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
