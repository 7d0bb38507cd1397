"""Triton kernels for the fast path: LoRA dropout whose mask is drawn, never stored, and
NF4 dequantisation in one pass.

PyTorch's dropout (``native_dropout``) writes the dropped input and a one-byte mask per
element, and the LoRA layer's backward then reads the mask again in a separate pass to
add the masked input gradient. At 8B x 8192 tokens that is seven masks a layer and two
extra passes over the largest activations. Here the mask is a pure function of a seed
and the element's index (Philox), so:

* ``dropout`` writes only the dropped input (no mask tensor);
* ``add_masked_lora_grad`` computes the LoRA term of the input gradient,
  ``(g_low @ A) * mask / (1 - p)``, as a small GEMM (K = the rank) whose epilogue draws
  the same mask again and adds the result into the base gradient in place;
* ``dropout_mm`` and ``dropout_mm_t`` are LoRA A's two GEMMs, ``dropout(x) @ A.T`` (the
  rank-wide term) and ``g.T @ dropout(x)`` (A's gradient), drawing the mask per tile of
  ``x`` as they read it: the dropped copy is neither written nor read back, where
  ``dropout`` writes it for cuBLAS to read (``FUSED_DROPOUT_MM``).

The seed comes from torch's CPU generator (``new_seed``), whose state a checkpoint's
recompute restores, so a recomputed layer draws the same masks as its forward. Each
element is kept independently, as with ``torch.nn.Dropout``; the masks differ from
PyTorch's (another random stream).

Both kernels spend more time on the Philox arithmetic than on memory (run 18: 59 us a
dropout against about 38 us of bytes). So one Philox call (128 random bits) draws for
``DRAWS_PER_CALL`` neighbouring elements of a row: 8 draws of 16 bits each, where curand
draws 4 of 32 (runs 19-20, H200, against 4 draws of 24 bits: the forward kernel
1.06-1.14x at widths 4096 and 14336, the backward epilogue 1.11-1.12x). An element is
dropped where its draw falls below ``round(p * 2**16)``, so the drop probability is
``p`` to within 2**-17 (0.05 -> 0.0500031); the kept elements are scaled by 1/(1-p), as
``torch.nn.Dropout`` does. ``PHILOX_ROUNDS`` is Random123's default of 10 (7 already
pass BigCrush; Salmon et al., SC'11).

``dequantize_nf4`` is bitsandbytes' ``dequantize_4bit`` for an NF4 weight with its double
quantisation, in one kernel and bit for bit: the block scales' own dequantisation
(``code2[q] * absmax2 + offset``) is done per tile in registers, where bitsandbytes runs
two more kernels (and PyTorch's ``add_``) and writes them out first. Its 4-bit kernel
also runs 64-thread blocks, at under half the card's memory bandwidth (run 18: 43 us a
weight on average, 2,176 a step). Run 20 (H200): 1.45x bitsandbytes' path at 14336 x
4096 (52 against 75 us; the short weights are bound by the launch, 1.07-1.14x), and a
training step on the realistic mix 1.2% faster (11,414 against 11,278 tokens/s).

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
# Draws a Philox call: 8 of 16 bits (the default) or 4 of 24 (the top bits of each word:
# the earlier kernels, which ``bench/train_speed.py``'s ``-draw4`` variant measures).
DRAWS_PER_CALL = 8
PHILOX_ROUNDS = 10


def available(x: torch.Tensor) -> bool:
    """Whether these kernels can take ``x``: 2-D, contiguous, small enough to index, and
    rows a multiple of 8 wide (one Philox call draws for 8 neighbours in a row)."""
    if triton is None or x.dim() != 2 or not x.is_contiguous() or x.numel() > _MAX_ELEMENTS:
        return False
    if x.shape[-1] % 8:
        return False
    if x.is_cuda:
        return x.dtype in (torch.bfloat16, torch.float16, torch.float32)
    return INTERPRET and x.dtype == torch.float32  # the interpreter has no bf16


def new_seed() -> int:
    """A dropout seed from torch's CPU generator (no GPU synchronisation)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _draw(p: float) -> dict:
    """The kernels' dropout arguments for probability ``p``: drop an element where its
    draw (16 or 24 bits) falls below ``threshold``; scale the kept ones by ``scale``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    per_call = DRAWS_PER_CALL
    if per_call not in (4, 8):
        raise ValueError(f"kernels.DRAWS_PER_CALL must be 4 or 8, got {per_call}")
    bits = 16 if per_call == 8 else 24
    threshold = min(round(p * (1 << bits)), (1 << bits) - 1)
    return {
        "threshold": threshold,
        "scale": 1.0 / (1.0 - p),
        "PER_CALL": per_call,
        "ROUNDS": PHILOX_ROUNDS,
    }


if triton is not None:

    @triton.jit
    def _keep(
        seed, calls, shape: tl.constexpr, threshold, PER_CALL: tl.constexpr, ROUNDS: tl.constexpr
    ):
        """Keep-mask of ``shape`` (rows, PER_CALL * calls' columns): element ``i`` of the
        flattened tensor takes draw ``i % PER_CALL`` of Philox call ``i // PER_CALL``."""
        r0, r1, r2, r3 = tl.randint4x(seed, calls, ROUNDS)
        words = tl.join(tl.join(r0, r1), tl.join(r2, r3))
        if PER_CALL == 8:  # both 16-bit halves of each word
            draws = tl.reshape(tl.join(words & 0xFFFF, words >> 16), shape)
        else:  # the top 24 bits of each word
            draws = tl.reshape(words >> 8, shape)
        return draws.to(tl.int32) >= threshold

    @triton.jit
    def _dropout_kernel(
        x_ptr,
        out_ptr,
        n,
        seed,
        threshold,
        scale,
        BLOCK: tl.constexpr,
        PER_CALL: tl.constexpr,
        ROUNDS: tl.constexpr,
    ):
        start = tl.program_id(0) * BLOCK
        calls = start // PER_CALL + tl.arange(0, BLOCK // PER_CALL)
        keep = _keep(seed, calls, (BLOCK,), threshold, PER_CALL, ROUNDS)
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
        PER_CALL: tl.constexpr,
        ROUNDS: tl.constexpr,
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
        groups = tl.program_id(1) * (BLOCK_N // PER_CALL) + tl.arange(0, BLOCK_N // PER_CALL)
        calls = rows[:, None] * (N // PER_CALL) + groups[None, :]
        keep = _keep(seed, calls, (BLOCK_M, BLOCK_N), threshold, PER_CALL, ROUNDS)
        offs = rows[:, None] * N + cols[None, :]
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        term = tl.where(keep, total * scale, 0.0)
        if ACCUMULATE:
            term += tl.load(acc_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(acc_ptr + offs, term.to(acc_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _dropped_tile(
        x_ptr,
        rows,
        cols,
        M,
        K,
        seed,
        threshold,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PER_CALL: tl.constexpr,
        ROUNDS: tl.constexpr,
    ):
        """The (BLOCK_M, BLOCK_K) tile of x at ``rows`` and ``cols`` (columns from a multiple
        of PER_CALL), dropped elements zeroed (not scaled), as ``dropout`` draws them."""
        x = tl.load(
            x_ptr + rows[:, None] * K + cols[None, :],
            mask=(rows[:, None] < M) & (cols[None, :] < K),
            other=0.0,
        )
        groups = tl.min(cols, axis=0) // PER_CALL + tl.arange(0, BLOCK_K // PER_CALL)
        calls = rows[:, None] * (K // PER_CALL) + groups[None, :]
        keep = _keep(seed, calls, (BLOCK_M, BLOCK_K), threshold, PER_CALL, ROUNDS)
        return tl.where(keep, x, 0.0)

    @triton.jit
    def _dropout_mm_kernel(
        x_ptr,
        a_ptr,
        out_ptr,
        M,
        K,
        R,
        seed,
        threshold,
        scale,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        PER_CALL: tl.constexpr,
        ROUNDS: tl.constexpr,
    ):
        """``out = dropout(x) @ a.T``: (M, K) by (R, K), the mask drawn per tile of x."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ranks = tl.arange(0, BLOCK_R)
        total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = _dropped_tile(
                x_ptr, rows, ks, M, K, seed, threshold, BLOCK_M, BLOCK_K, PER_CALL, ROUNDS
            )
            a_t = tl.load(
                a_ptr + ranks[None, :] * K + ks[:, None],
                mask=(ks[:, None] < K) & (ranks[None, :] < R),
                other=0.0,
            )
            total += tl.dot(x.to(a_t.dtype), a_t)
        inside = (rows[:, None] < M) & (ranks[None, :] < R)
        out = (total * scale).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * R + ranks[None, :], out, mask=inside)

    @triton.jit
    def _dropout_mm_t_kernel(
        g_ptr,
        x_ptr,
        out_ptr,
        M,
        K,
        R,
        rows_per_split,
        seed,
        threshold,
        scale,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
        PER_CALL: tl.constexpr,
        ROUNDS: tl.constexpr,
    ):
        """``out[split] = g[rows].T @ dropout(x)[rows]`` over one split's rows: (R, K) in
        float32, the splits summed by the caller."""
        cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        first = tl.program_id(1) * rows_per_split
        ranks = tl.arange(0, BLOCK_R)
        total = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, rows_per_split, BLOCK_M):
            rows = first + m0 + tl.arange(0, BLOCK_M)
            x = _dropped_tile(
                x_ptr, rows, cols, M, K, seed, threshold, BLOCK_M, BLOCK_K, PER_CALL, ROUNDS
            )
            g = tl.load(
                g_ptr + rows[:, None] * R + ranks[None, :],
                mask=(rows[:, None] < M) & (ranks[None, :] < R),
                other=0.0,
            )
            total += tl.dot(tl.trans(g), x.to(g.dtype))
        offs = tl.program_id(1) * R * K + ranks[:, None] * K + cols[None, :]
        tl.store(out_ptr + offs, total * scale, mask=(ranks[:, None] < R) & (cols[None, :] < K))


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``x`` with each element zeroed with probability ``p`` (to 2**-17: see the module's
    docstring) and the rest scaled by 1/(1-p)."""
    assert available(x), "dropout kernel: see kernels.available for what it takes"
    out = torch.empty_like(x)
    block = 2048
    grid = (triton.cdiv(x.numel(), block),)
    _dropout_kernel[grid](x, out, x.numel(), seed, **_draw(p), BLOCK=block)
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
        **_draw(p),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ACCUMULATE=accumulate,
        num_warps=4,
    )
    return acc


# Whether the LoRA node draws its dropout inside the small GEMMs that read the dropped
# input (``dropout_mm``, ``dropout_mm_t``) instead of writing it out (``dropout``) for
# cuBLAS to read. Run 46 (H100): the forward 1.22-1.28x and A's gradient 1.72-1.87x the
# written copy + cuBLAS at 8192 tokens, 1.1% on a Llama 8B step at 40 GiB; ``-nofusedrop``
# in ``bench/train_speed.py`` and ``bench/lora_kernels.py fused`` measure it.
FUSED_DROPOUT_MM = True
# Tiles of the two kernels (rows, input columns, warps): run 46's best of five
# (``bench/lora_kernels.py fused``).
DROPOUT_MM_TILES = (32, 128, 4)
DROPOUT_MM_T_TILES = (64, 64, 4)
# The backward kernel splits the tokens so that about this many programs run.
DROPOUT_MM_T_PROGRAMS = 512


def dropout_mm(x: torch.Tensor, a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``dropout(x, p, seed) @ a.T`` without writing the dropped input: the mask is drawn
    per tile of ``x`` as the GEMM reads it. ``x`` (tokens, in), ``a`` (rank, in); the
    result (tokens, rank) in ``x``'s dtype, summed in float32 and scaled by 1/(1-p) once."""
    m, k = x.shape
    r = a.shape[0]
    assert available(x) and a.shape == (r, k) and a.dtype == x.dtype
    a = a.contiguous()
    out = x.new_empty(m, r)
    grid = (triton.cdiv(m, DROPOUT_MM_TILES[0]),)
    _launch_drawn(_dropout_mm_kernel, grid, (x, a, out, m, k, r), p, seed, DROPOUT_MM_TILES, r)
    return out


def dropout_mm_t(g: torch.Tensor, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``g.T @ dropout(x, p, seed)`` in float32 without the dropped input: LoRA A's
    gradient, ``g`` (tokens, rank) the gradient of the rank-wide term, ``x`` (tokens, in).
    The tokens are split so that enough programs run; the splits' sums are added last."""
    m, k = x.shape
    r = g.shape[1]
    assert available(x) and g.shape == (m, r)
    g = g.contiguous().to(x.dtype)
    block_m, block_k, _ = DROPOUT_MM_T_TILES
    columns = triton.cdiv(k, block_k)
    splits = max(1, min(triton.cdiv(m, block_m), DROPOUT_MM_T_PROGRAMS // columns))
    rows_per_split = triton.cdiv(triton.cdiv(m, splits), block_m) * block_m
    splits = triton.cdiv(m, rows_per_split)
    out = torch.empty(splits, r, k, dtype=torch.float32, device=x.device)
    args = (g, x, out, m, k, r, rows_per_split)
    _launch_drawn(_dropout_mm_t_kernel, (columns, splits), args, p, seed, DROPOUT_MM_T_TILES, r)
    return out[0] if splits == 1 else out.sum(0)


def _launch_drawn(kernel, grid: tuple, args: tuple, p: float, seed: int, tiles, rank: int):
    """Launch one of LoRA A's GEMMs that draw the mask: ``args``, then the draw's own."""
    block_m, block_k, warps = tiles
    kernel[grid](
        *args,
        seed,
        **_draw(p),
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
        num_warps=warps,
    )


def nf4_available(packed: torch.Tensor, state, dtype: torch.dtype) -> bool:
    """Whether ``dequantize_nf4`` can take this bitsandbytes 4-bit weight: NF4, its packed
    data contiguous on CUDA (or in the interpreter, to float32), blocks of a power of 2."""
    if triton is None or state.quant_type != "nf4":
        return False
    if not packed.is_contiguous() or packed.dtype != torch.uint8 or packed.numel() >= 2**30:
        return False
    if state.code.device != packed.device or state.absmax.device != packed.device:
        return False  # bitsandbytes' own path says what is wrong
    sizes = [state.blocksize] + ([state.state2.blocksize] if state.nested else [])
    if any(b < 2 or b & (b - 1) for b in sizes) or state.blocksize > NF4_BLOCK:
        return False
    if packed.is_cuda:
        return dtype in (torch.bfloat16, torch.float16, torch.float32)
    return INTERPRET and dtype == torch.float32


# Whether the fast path uses ``dequantize_nf4`` where it can (``-bnbdequant`` in
# ``bench/train_speed.py`` turns it off).
FUSED_NF4 = True
NF4_BLOCK, NF4_WARPS = 4096, 4  # weights a program, warps a program


if triton is not None:

    @triton.jit
    def _nf4_kernel(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        out_ptr,
        absmax2_ptr,
        code2_ptr,
        offset_ptr,
        n,
        BLOCK: tl.constexpr,
        QBLOCK: tl.constexpr,
        QBLOCK2: tl.constexpr,
        NESTED: tl.constexpr,
    ):
        start = tl.program_id(0) * BLOCK
        # Two weights a byte, the high nibble first.
        byte = start // 2 + tl.arange(0, BLOCK // 2)
        packed = tl.load(packed_ptr + byte, mask=byte < (n + 1) // 2, other=0)
        nibble = tl.reshape(tl.join(packed >> 4, packed & 15), (BLOCK // QBLOCK, QBLOCK))
        value = tl.load(code_ptr + nibble.to(tl.int32))
        block = start // QBLOCK + tl.arange(0, BLOCK // QBLOCK)
        inside = block < (n + QBLOCK - 1) // QBLOCK
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=inside, other=0).to(tl.int32)
            outer = tl.load(absmax2_ptr + block // QBLOCK2, mask=inside, other=0.0)
            scale = tl.load(code2_ptr + q) * outer + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=inside, other=0.0)
        offs = block[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        out = (value * scale[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs, out, mask=offs < n)


def dequantize_nf4(packed: torch.Tensor, state, dtype: torch.dtype) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit(packed, state)`` in ``dtype``, bit for bit
    (what ``nf4_available`` accepts: the caller checks it, once per weight)."""
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    n = out.numel()
    nested = state.nested
    # Without nesting the second level is never read: any tensors stand in for it.
    inner = state.state2 if nested else state
    offset = state.offset if nested else state.absmax
    grid = (triton.cdiv(n, NF4_BLOCK),)
    _nf4_kernel[grid](
        packed,
        state.absmax,
        state.code,
        out,
        inner.absmax,
        inner.code,
        offset,
        n,
        BLOCK=NF4_BLOCK,
        QBLOCK=state.blocksize,
        QBLOCK2=inner.blocksize if nested else 1,
        NESTED=nested,
        num_warps=NF4_WARPS,
        enable_fp_fusion=False,  # code2[q] * absmax2 + offset rounded twice, as bitsandbytes
    )
    return out
