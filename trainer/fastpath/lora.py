"""One autograd node per LoRA layer.

PEFT's 4-bit LoRA layer clones the base output, scales the LoRA output and adds it (three
passes over the largest activations), and its backward runs a dropout-backward pass and a
separate add. ``fuse_lora`` (``trainer.fastpath.preparation``) gives each layer
``fused_lora_forward``, which runs ``LoraLinear``: ``base + scaling * (dropout(x) A^T) B^T``
with the LoRA term added into the base GEMM's output in place, and the input gradient's LoRA
term added into the base one in place. Its dropout mask is drawn from a seed in a Triton
kernel and never stored (``trainer.fastpath.kernels``): the backward draws it again in the
epilogue of the small GEMM that adds the LoRA term to the input gradient; with
``kernels.FUSED_DROPOUT_MM``, outside a recompute, A's two GEMMs draw it as they read the
input (``kernels.dropout_mm``), so the dropped copy is never written. The base weight is
read through ``nf4.base_weight``.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.fastpath import elementwise, kernels, nf4, parking


class LoraLinear(torch.autograd.Function):
    """``base(x) + scaling * dropout(x) A^T B^T`` as one autograd node (a plain LoRA layer).

    What PEFT's bnb layer computes, with fewer passes over the activations: the LoRA term
    is added into the base GEMM's output in place (PEFT clones it and adds; an
    out-of-place ``addmm`` copies it first), and the backward adds the LoRA input
    gradient into the base one in place (``addmm_``, or one masked ``addcmul_`` with
    dropout) instead of a dropout-backward pass and a separate add. Where ``first`` (from
    ``lora_first``: forward, input gradient) says so, the order is the other way round:
    the LoRA term is written first and the long base GEMM adds into it. The NF4 weight is
    dequantised in the forward and again in the backward, as bitsandbytes does. With
    dropout, where Triton runs (``trainer.fastpath.kernels``), the mask is drawn from a seed and
    never stored: the backward's epilogue draws it again while adding the LoRA term, and,
    in a layer that is not recomputed, once more for A's gradient instead of keeping the
    dropped input.
    Elsewhere it is PyTorch's own (``native_dropout``, the kernel ``nn.Dropout`` runs).
    Either way a checkpointed layer's recompute draws the same mask (the seed comes from
    the CPU generator, whose state the checkpoint restores).
    """

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, base, scaling, p, skip=False, first=(False, False)):  # type: ignore[override]
        # A frozen bias (Qwen 2's q/k/v) joins the first GEMM's epilogue; it takes no
        # gradient (``plain_weight`` sends a trainable one to PEFT's path).
        dev = x.device.type
        dtype = (
            torch.get_autocast_dtype(dev)
            if torch.is_autocast_enabled(dev)
            else getattr(base, "compute_dtype", None) or x.dtype
        )
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        mask, seed, fused = None, None, False
        xd = x2
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        if p > 0 and kernels.available(x2):
            seed = kernels.new_seed()  # a recompute draws it again: the same mask
            # Outside a recompute the mask is drawn inside the GEMM that reads the dropped
            # input, never written (and again in A's gradient); a recompute writes the
            # dropped copy once and keeps it for its backward, which follows at once.
            fused = kernels.FUSED_DROPOUT_MM and not parking.RECOMPUTE["on"]
            xd = None if fused else kernels.dropout(x2, p, seed)
        elif p > 0:
            xd, mask = torch.native_dropout(x2, p, True)
        bias = getattr(base, "bias", None)
        bias = None if bias is None else bias.to(dtype)
        low = kernels.dropout_mm(x2, a, p, seed) if fused else torch.mm(xd, a.t())
        if skip:  # a recompute whose output only feeds the layer's (unused) output
            out = x2.new_empty(x2.shape[0], weight_b.shape[0])
        elif first[0]:  # the base GEMM's epilogue adds into the LoRA term
            out = _mm(low, b.t() * scaling, bias).addmm_(x2, nf4.base_weight(base, dtype).t())
        else:
            out = _mm(x2, nf4.base_weight(base, dtype).t(), bias)
            out.addmm_(low, b.t(), alpha=scaling)
        ctx.base, ctx.scaling, ctx.p, ctx.seed, ctx.first = base, scaling, p, seed, first
        ctx.shape, ctx.x_dtype = shape, x.dtype
        ctx.ab_dtypes = (weight_a.dtype, weight_b.dtype)
        # Outside a recompute (a kept layer: what is saved lives until its backward) the
        # undropped input is saved, one tensor that q/k/v (and gate/up) share, and the
        # backward draws the dropped copy again for A's gradient: a layer's activations
        # are 4 hidden-wide tensors a token smaller (8 GiB over 32 layers at 8B x 8192
        # tokens, H200 run 39). A recompute's backward follows at once: it keeps its copy.
        ctx.redraw = seed is not None and not parking.RECOMPUTE["on"]
        ctx.fused = fused
        ctx.save_for_backward(x2 if ctx.redraw else xd, mask, low, a, b)
        return out.view(*shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        saved_x, mask, low, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
        g_low = torch.mm(g, b).mul_(s)  # d(low): (tokens, r)
        grad_b = torch.mm(g.t(), low).mul_(s) if ctx.needs_input_grad[2] else None
        grad_a = None
        if ctx.needs_input_grad[1] and ctx.fused:
            grad_a = kernels.dropout_mm_t(g_low, saved_x, ctx.p, ctx.seed)
        elif ctx.needs_input_grad[1]:
            xd = kernels.dropout(saved_x, ctx.p, ctx.seed) if ctx.redraw else saved_x
            grad_a = torch.mm(g_low.t(), xd)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = nf4.base_weight(ctx.base, a.dtype)
            if ctx.first[1] and mask is None:  # the LoRA term first, the base GEMM adds to it
                if ctx.seed is not None:
                    lora = g.new_empty(g.shape[0], a.shape[1])
                    kernels.add_masked_lora_grad(lora, g_low, a, ctx.p, ctx.seed, accumulate=False)
                else:
                    lora = torch.mm(g_low, a)
                grad_x = lora.addmm_(g, w)
            else:
                grad_x = torch.mm(g, w)
                if ctx.seed is not None:
                    kernels.add_masked_lora_grad(grad_x, g_low, a, ctx.p, ctx.seed)
                elif mask is None:
                    grad_x.addmm_(g_low, a)
                else:
                    grad_x = elementwise.add_dropout_grad(
                        grad_x, torch.mm(g_low, a), mask, 1 / (1 - ctx.p)
                    )
            grad_x = grad_x.view(ctx.shape).to(ctx.x_dtype)
        da, db = ctx.ab_dtypes
        grad_a = grad_a.to(da) if grad_a is not None else None
        grad_b = grad_b.to(db) if grad_b is not None else None
        return grad_x, grad_a, grad_b, None, None, None, None, None


def _mm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w``, plus ``bias`` in the GEMM's epilogue where there is one."""
    return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)


def lora_first(in_features: int, out_features: int) -> tuple[bool, bool]:
    """Whether ``LoraLinear`` writes the LoRA term first and lets the base GEMM add into
    it (the GEMM's epilogue reads it, behind the GEMM's compute), in the forward and in
    the input gradient; otherwise the base GEMM writes and a separate pass over the output
    adds the LoRA term. Measured on an H200 at 8192 tokens (``bench/lora_kernels.py``):
    first pays for the MLP's large GEMMs in the forward (1.02-1.05x) and for every input
    gradient but a narrow projection's (1.01-1.13x); it costs where the base GEMM is short
    (q/o forward 0.95x, k/v 0.93-0.97x)."""
    return in_features * out_features >= 3 * 2**24, 4 * out_features > in_features


def fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(active) != 1
        or active[0] in getattr(self, "lora_variant", {})
        or getattr(self.lora_B[active[0]], "bias", None) is not None
    ):
        return self._fastpath_forward(x, *args, **kwargs)
    name = active[0]
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    base = self.base_layer
    if getattr(self, "_fastpath_autograd", True) and plain_weight(base) is not None:
        drop = self.lora_dropout[name]
        p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
        replayed = getattr(self, "_fastpath_replayed", None)  # "attention" or "residual"
        skip = parking.RECOMPUTE["on"] and (
            getattr(self, "_fastpath_output_unused", False)
            or (replayed is not None and replayed == parking.replay_head())
        )
        scaling = self.scaling[name]
        first = getattr(self, "_fastpath_lora_first", (False, False))
        return LoraLinear.apply(x, lora_A.weight, lora_B.weight, base, scaling, p, skip, first)
    result = base(x)
    out_dtype = result.dtype
    if not torch.is_autocast_enabled(x.device.type):
        x = x.to(lora_A.weight.dtype)
        result = result.to(lora_A.weight.dtype)
    low = lora_A(self.lora_dropout[name](x))
    fused = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        low.reshape(-1, low.shape[-1]),
        lora_B.weight.t(),
        alpha=self.scaling[name],
    )
    return fused.view(result.shape).to(out_dtype)


def plain_weight(base: torch.nn.Module) -> Any:
    """The base layer's weight if ``LoraLinear`` can take it: a bitsandbytes 4-bit or plain
    linear layer whose bias, if any, is frozen (else None, and the layer keeps the module
    path)."""
    weight = getattr(base, "weight", None)
    bias = getattr(base, "bias", None)
    if weight is None or (bias is not None and bias.requires_grad):
        return None
    state = getattr(weight, "quant_state", None)
    if state is not None:
        if getattr(state, "packing_format_for_cpu", False):
            return None  # bitsandbytes' CPU inference layout: not what dequantize_4bit reads
        return weight
    return weight if type(base) is torch.nn.Linear else None
