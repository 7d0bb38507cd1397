"""Triton kernels for the fast path's LoRA dropout: the mask is drawn, never stored.

PyTorch's dropout (``native_dropout``) writes the dropped input and a one-byte mask per
element, and the LoRA layer's backward then reads the mask again in a separate pass to
add the masked input gradient. At 8B x 8192 tokens that is seven masks a layer and two
extra passes over the largest activations. Here the mask is a pure function of a seed
and the element's index (Philox, four draws per call, as curand does), so:

* ``dropout`` writes only the dropped input (no mask tensor);
* ``add_masked_lora_grad`` computes the LoRA term of the input gradient,
  ``(g_low @ A) * mask / (1 - p)``, as a small GEMM (K = the rank) whose epilogue draws
  the same mask again and adds the result into the base gradient in place.

The seed comes from torch's CPU generator (``new_seed``), whose state a checkpoint's
recompute restores, so a recomputed layer draws the same masks as its forward. Each
element is kept with probability ``1 - p`` (to 2**-24) independently, as with
``torch.nn.Dropout``; the masks differ from PyTorch's (another random stream).

On CUDA the kernels are compiled; on the CPU, Triton's interpreter
(``TRITON_INTERPRET=1``, float32) runs them, which is how the tests check them here.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without Triton keeps PyTorch's dropout
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Element indices are int32 in the kernels; a tile may reach past the end by a block.
_MAX_ELEMENTS = 2**31 - 2**22


def available(x: torch.Tensor) -> bool:
    """Whether these kernels can take ``x``: 2-D, contiguous, small enough to index, and
    rows a multiple of 4 wide (one Philox call draws for 4 neighbours in a row)."""
    if triton is None or x.dim() != 2 or not x.is_contiguous() or x.numel() > _MAX_ELEMENTS:
        return False
    if x.shape[-1] % 4:
        return False
    if x.is_cuda:
        return x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return INTERPRET and x.dtype == torch.float32  # the interpreter has no bf16


def new_seed() -> int:
    """A dropout seed from torch's CPU generator (no GPU synchronisation)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _threshold(p: float) -> int:
    """Drop an element where the top 24 bits of its draw fall below this."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * (1 << 24))


if triton is not None:

    @triton.jit
    def _keep(seed, index4, shape: tl.constexpr, threshold):
        """Keep-mask of ``shape`` (rows, 4 * index4's columns), drawn 4 elements a Philox call:
        element ``i`` of the flattened tensor is component ``i % 4`` of draw ``i // 4``."""
        r0, r1, r2, r3 = tl.randint4x(seed, index4)
        draws = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), shape)
        return (draws >> 8).to(tl.int32) >= threshold

    @triton.jit
    def _dropout_kernel(x_ptr, out_ptr, n, seed, threshold, scale, BLOCK: tl.constexpr):
        start = tl.program_id(0) * BLOCK
        index4 = start // 4 + tl.arange(0, BLOCK // 4)
        keep = _keep(seed, index4, (BLOCK,), threshold)
        offs = start + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        y = tl.where(keep, x * scale, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _masked_lora_grad_kernel(
        acc_ptr,
        g_ptr,
        a_ptr,
        M,
        N,
        K,
        seed,
        threshold,
        scale,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        ACCUMULATE: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            g = tl.load(
                g_ptr + rows[:, None] * K + ks[None, :],
                mask=(rows[:, None] < M) & (ks[None, :] < K),
                other=0.0,
            )
            a = tl.load(
                a_ptr + ks[:, None] * N + cols[None, :],
                mask=(ks[:, None] < K) & (cols[None, :] < N),
                other=0.0,
            )
            total += tl.dot(g, a)
        quads = tl.program_id(1) * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)
        index4 = rows[:, None] * (N // 4) + quads[None, :]
        keep = _keep(seed, index4, (BLOCK_M, BLOCK_N), threshold)
        offs = rows[:, None] * N + cols[None, :]
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        term = tl.where(keep, total * scale, 0.0)
        if ACCUMULATE:
            term += tl.load(acc_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(acc_ptr + offs, term.to(acc_ptr.dtype.element_ty), mask=inside)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x`` with each element zeroed with probability ``p`` and the rest scaled by 1/(1-p)."""
    assert available(x), "dropout kernel: see kernels.available for what it takes"
    out = torch.empty_like(x)
    block = 2048
    grid = (triton.cdiv(x.numel(), block),)
    _dropout_kernel[grid](x, out, x.numel(), seed, _threshold(p), 1.0 / (1.0 - p), BLOCK=block)
    return out


def add_masked_lora_grad(
    acc: torch.Tensor,
    g_low: torch.Tensor,
    a: torch.Tensor,
    p: float,
    seed: int,
    accumulate: bool = True,
) -> torch.Tensor:
    """``acc += (g_low @ a) * mask / (1 - p)`` in place, ``mask`` the one ``dropout(x, p,
    seed)`` drew for an ``x`` of ``acc``'s shape (``acc =`` with ``accumulate=False``:
    ``acc``'s values are not read). ``acc`` (tokens, in), ``g_low`` (tokens, rank),
    ``a`` (rank, in)."""
    m, n = acc.shape
    k = a.shape[0]
    assert available(acc) and g_low.shape == (m, k) and a.shape == (k, n)
    g_low, a = g_low.contiguous(), a.contiguous()
    # 64 x 128 tiles, 4 warps: the fastest of 8 shapes tried on an H200 (1.45x PyTorch's
    # mm + masked add at 8192 x 4096, 1.43x at 8192 x 14336; bench/lora_kernels.py).
    block_m, block_n, block_k = 64, 128, max(16, min(64, triton.next_power_of_2(k)))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _masked_lora_grad_kernel[grid](
        acc,
        g_low,
        a,
        m,
        n,
        k,
        seed,
        _threshold(p),
        1.0 / (1.0 - p),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ACCUMULATE=accumulate,
        num_warps=4,
    )
    return acc
