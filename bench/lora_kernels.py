"""LoRA dropout on the GPU: PyTorch's (stored mask) against ``trainer.fastpath.kernels``
(drawn mask).

For the 8B layer shapes at 4 x 2048 tokens, times one LoRA layer's dropout work in the
forward (the dropped input) and in the backward (the LoRA term of the input gradient
added into the base one), both ways, and prints the figures and the ratio, measured in
the same run; likewise where the LoRA term joins the base GEMM, and NF4 dequantisation
(bitsandbytes' kernels against ``kernels.dequantize_nf4``). ``python3
bench/lora_kernels.py`` on a CUDA machine.
"""

from __future__ import annotations

import torch

from trainer.fastpath import elementwise, kernels, nf4

TOKENS, RANK, P = 8192, 64, 0.05
SHAPES = {"q/k/v/o/gate/up input (4096)": 4096, "down input (14336)": 14336}


def _time_ms(fn, repeat: int = 50) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    elementwise.compile_elementwise(torch.nn.Module())  # the compiled masked add (baseline)
    dev, bf16 = "cuda", torch.bfloat16
    scale = 1.0 / (1.0 - P)
    print(f"{torch.cuda.get_device_name()}: tokens {TOKENS}, rank {RANK}, p {P}")
    for name, width in SHAPES.items():
        x = torch.randn(TOKENS, width, device=dev, dtype=bf16)
        g_low = torch.randn(TOKENS, RANK, device=dev, dtype=bf16)
        a = torch.randn(RANK, width, device=dev, dtype=bf16)
        acc = torch.randn(TOKENS, width, device=dev, dtype=bf16)
        _, mask = torch.native_dropout(x, P, True)

        def torch_backward(acc=acc, g_low=g_low, a=a, mask=mask):
            elementwise.add_dropout_grad(acc, torch.mm(g_low, a), mask, scale)

        def drawn_backward(acc=acc, g_low=g_low, a=a):
            kernels.add_masked_lora_grad(acc, g_low, a, P, 1234)

        rows = {
            "forward: torch native_dropout": _time_ms(lambda x=x: torch.native_dropout(x, P, True)),
            "backward: mm + compiled masked add": _time_ms(torch_backward),
        }
        # The kernels with each Philox setting: draws a call, rounds (the default last).
        for per_call, rounds in ((4, 10), (8, 7), (8, 10)):
            kernels.DRAWS_PER_CALL, kernels.PHILOX_ROUNDS = per_call, rounds
            how = f"{per_call} draws/call, {rounds} rounds"
            rows[f"forward: kernels.dropout, {how}"] = _time_ms(
                lambda x=x: kernels.dropout(x, P, 1234)
            )
            rows[f"backward: kernels.add_masked_lora_grad, {how}"] = _time_ms(drawn_backward)
        # The fused epilogue adds what the two-step path adds, with the mask it draws.
        keep = kernels.dropout(torch.ones_like(x), P, 1234) != 0
        want = acc.float() + (g_low.float() @ a.float()) * keep * scale
        got = kernels.add_masked_lora_grad(acc.clone(), g_low, a, P, 1234).float()
        err = ((got - want).norm() / want.norm()).item()
        kept = keep.float().mean().item()
        print(f"\n{name}: kept share {kept:.4f} (want {1 - P}), epilogue rel. error {err:.1e}")
        for label, ms in rows.items():
            print(f"  {label:<66} {ms * 1e3:8.1f} us")
        fwd = rows["forward: torch native_dropout"] / rows[f"forward: kernels.dropout, {how}"]
        bwd = (
            rows["backward: mm + compiled masked add"]
            / rows[f"backward: kernels.add_masked_lora_grad, {how}"]
        )
        print(f"  ratio torch/kernels ({how}): forward {fwd:.2f}x, backward {bwd:.2f}x")
        for step in ("forward: kernels.dropout", "backward: kernels.add_masked_lora_grad"):
            base = rows[f"{step}, 4 draws/call, 10 rounds"]
            for other in ("8 draws/call, 7 rounds", "8 draws/call, 10 rounds"):
                ratio = base / rows[f"{step}, {other}"]
                print(f"  {step}: (4 draws/call, 10 rounds) / ({other}) {ratio:.2f}x")


def gemm_order() -> None:
    """Where the LoRA term joins the base GEMM: added after it (``addmm_`` re-reads and
    rewrites the output, a memory-bound pass) or written first and taken in by the base
    GEMM's epilogue (beta = 1 in a compute-bound kernel)."""
    dev, bf16 = "cuda", torch.bfloat16
    print(f"\nLoRA term and base GEMM, tokens {TOKENS}, rank {RANK}")
    for k, n in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)):
        x = torch.randn(TOKENS, k, device=dev, dtype=bf16)
        w = torch.randn(n, k, device=dev, dtype=bf16)
        low = torch.randn(TOKENS, RANK, device=dev, dtype=bf16)
        b = torch.randn(n, RANK, device=dev, dtype=bf16)

        def after(x=x, w=w, low=low, b=b):
            torch.mm(x, w.t()).addmm_(low, b.t(), alpha=2.0)

        def first(x=x, w=w, low=low, b=b):
            torch.mm(low, b.t()).mul_(2.0).addmm_(x, w.t())

        def first_scaled(x=x, w=w, low=low, b=b):
            torch.mm(low, (b * 2.0).t()).addmm_(x, w.t())

        def base_only(x=x, w=w):
            torch.mm(x, w.t())

        # The backward's input gradient (x's width is the GEMM's output here): the base
        # term first and the drawn-mask LoRA term added in place, or that term written
        # first and the base GEMM adding into it.
        g = torch.randn(TOKENS, n, device=dev, dtype=bf16)
        g_low = torch.randn(TOKENS, RANK, device=dev, dtype=bf16)
        a = torch.randn(RANK, k, device=dev, dtype=bf16)

        def grad_after(g=g, w=w, g_low=g_low, a=a):
            kernels.add_masked_lora_grad(torch.mm(g, w), g_low, a, P, 1234)

        def grad_first(g=g, w=w, g_low=g_low, a=a):
            out = torch.empty(TOKENS, a.shape[1], device=dev, dtype=bf16)
            kernels.add_masked_lora_grad(out, g_low, a, P, 1234, accumulate=False).addmm_(g, w)

        fns = (base_only, after, first, first_scaled, grad_after, grad_first)
        t = {f.__name__: _time_ms(f) for f in fns}
        print(
            f"  {k:>5} -> {n:<5}: base GEMM {t['base_only'] * 1e3:7.1f} us | "
            f"+LoRA after {t['after'] * 1e3:7.1f} | first {t['first'] * 1e3:7.1f} | "
            f"first, B scaled {t['first_scaled'] * 1e3:7.1f} | "
            f"after/first {t['after'] / t['first_scaled']:.3f}x"
        )
        print(
            f"  {'':>14} input grad: LoRA term after {t['grad_after'] * 1e3:7.1f} us | "
            f"first {t['grad_first'] * 1e3:7.1f} | "
            f"after/first {t['grad_after'] / t['grad_first']:.3f}x"
        )


def nf4_dequantisation() -> None:
    """One NF4 weight (double quantisation) to bf16: bitsandbytes' kernels, as the fast
    path calls them, against ``kernels.dequantize_nf4``; the two outputs compared bit for
    bit, and the time against the bytes' time at the card's 4.8 TB/s."""
    import bitsandbytes.functional as F

    print("\nNF4 dequantisation to bf16 (double quantisation)")
    for n, k in ((4096, 4096), (1024, 4096), (14336, 4096)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        holder = torch.nn.Module()
        holder.weight = torch.nn.Parameter(packed, requires_grad=False)
        holder.weight.quant_state = state
        weight = nf4.NF4Weight(holder)
        t = {}
        for fused in (False, True):
            kernels.FUSED_NF4 = fused
            t[fused] = _time_ms(lambda weight=weight: weight.dequantize(torch.bfloat16))
        # Weights and warps a program of the one kernel (the default, 4096 and 4, last).
        sweep = []
        for block, warps in ((2048, 4), (8192, 4), (8192, 8), (16384, 8), (4096, 8), (4096, 4)):
            kernels.NF4_BLOCK, kernels.NF4_WARPS = block, warps
            us = _time_ms(lambda p=packed, s=state: kernels.dequantize_nf4(p, s, torch.bfloat16))
            sweep.append(f"{block}/{warps}w {us * 1e3:.1f}")
        print(f"  {n:>5} x {k}: one kernel by weights/warps a program (us): {', '.join(sweep)}")
        same = torch.equal(
            kernels.dequantize_nf4(packed, state, torch.bfloat16), weight.dequantize(torch.bfloat16)
        )
        floor_us = (packed.numel() + 2 * n * k) / 4.8e12 * 1e6
        print(
            f"  {n:>5} x {k}: bitsandbytes {t[False] * 1e3:7.1f} us | one kernel "
            f"{t[True] * 1e3:7.1f} us | ratio {t[False] / t[True]:.2f}x | bytes at 4.8 TB/s "
            f"{floor_us:5.1f} us | equal: {same}"
        )


def fused_dropout_mm() -> None:
    """LoRA A's two GEMMs with the dropout drawn inside them (``kernels.dropout_mm``,
    ``kernels.dropout_mm_t``) against the written dropped copy and cuBLAS: the forward's
    ``dropout(x) @ A.T`` and A's gradient ``g.T @ dropout(x)`` (the redraw of a kept
    layer), each tile setting timed, the results compared."""
    dev, bf16 = "cuda", torch.bfloat16
    print(f"\nDropout inside LoRA A's GEMMs, {TOKENS} tokens, rank {RANK}, p {P}")
    defaults = kernels.DROPOUT_MM_TILES, kernels.DROPOUT_MM_T_TILES, kernels.DROPOUT_MM_T_PROGRAMS
    for name, width in SHAPES.items():
        x = torch.randn(TOKENS, width, device=dev, dtype=bf16)
        a = torch.randn(RANK, width, device=dev, dtype=bf16) / width**0.5
        g = torch.randn(TOKENS, RANK, device=dev, dtype=bf16)
        dropped = kernels.dropout(x, P, 1234)
        want_low, want_grad = (dropped @ a.t()).float(), (g.t() @ dropped).float()
        err_low = (kernels.dropout_mm(x, a, P, 1234).float() - want_low).norm() / want_low.norm()
        err_grad = (kernels.dropout_mm_t(g, x, P, 1234) - want_grad).norm() / want_grad.norm()
        print(f"  {name}: relative error forward {err_low:.1e}, A's gradient {err_grad:.1e}")
        fwd = _time_ms(lambda x=x, a=a: torch.mm(kernels.dropout(x, P, 1234), a.t()))
        bwd = _time_ms(lambda x=x, g=g: torch.mm(g.t(), kernels.dropout(x, P, 1234)))
        print(f"    written copy + cuBLAS: forward {fwd * 1e3:.1f} us, A's gradient", end="")
        print(f" {bwd * 1e3:.1f} us")
        for tiles in ((64, 64, 4), (128, 64, 4), (128, 64, 8), (64, 128, 4), (32, 128, 4)):
            kernels.DROPOUT_MM_TILES = kernels.DROPOUT_MM_T_TILES = tiles
            f = _time_ms(lambda x=x, a=a: kernels.dropout_mm(x, a, P, 1234))
            runs = []
            for programs in (256, 512, 1024):
                kernels.DROPOUT_MM_T_PROGRAMS = programs
                runs.append(_time_ms(lambda x=x, g=g: kernels.dropout_mm_t(g, x, P, 1234)))
            best = min(runs)
            print(
                f"    tiles {tiles}: forward {f * 1e3:.1f} us ({fwd / f:.2f}x), A's gradient "
                f"{', '.join(f'{t * 1e3:.1f}' for t in runs)} us at 256/512/1024 programs "
                f"({bwd / best:.2f}x)"
            )
        kernels.DROPOUT_MM_TILES, kernels.DROPOUT_MM_T_TILES = defaults[:2]
        kernels.DROPOUT_MM_T_PROGRAMS = defaults[2]


if __name__ == "__main__":
    import sys

    # ``python3 bench/lora_kernels.py [dropout] [order] [nf4] [fused]``: those parts (all by
    # default).
    parts = {
        "dropout": main,
        "order": gemm_order,
        "nf4": nf4_dequantisation,
        "fused": fused_dropout_mm,
    }
    for part in sys.argv[1:] or list(parts):
        parts[part]()
