"""NF4 base weights, dequantised for the LoRA layers (``trainer.fastpath.lora``).

NF4 weights are read once (``NF4Weight``): their dequantisation skips ``Params4bit``'s Python
``__torch_function__`` and, on CUDA, the custom-op dispatch, host time the GPU waits for in
the short layers. On CUDA an NF4 weight dequantises in one kernel (``kernels.dequantize_nf4``,
bitsandbytes' result bit for bit in one pass, where bitsandbytes runs three kernels and an
add for a double-quantised weight: 2,176 dequantisations a step at 8B).
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.fastpath import kernels


def base_weight(base: Any, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base weight, (out, in), in ``dtype``: NF4 dequantised on the fly."""
    weight = base.weight
    if getattr(weight, "quant_state", None) is None:
        return weight.detach().to(dtype)
    nf4 = base.__dict__.get("_fastpath_nf4")
    with torch._C.DisableTorchFunctionSubclass():  # 0.7 us, not Params4bit's 3.4
        ptr = weight.data_ptr()
    # A weight replaced on the module, or its data swapped in place (``Module.to`` does
    # that), has other data or another state: it is read again.
    if nf4 is None or nf4.ptr != ptr or nf4.state is not weight.quant_state:
        nf4 = base.__dict__["_fastpath_nf4"] = NF4Weight(base)
    return nf4.dequantize(dtype)


class NF4Weight:
    """A bitsandbytes 4-bit weight, read once for the dequantisations of every step.

    ``bitsandbytes.functional.dequantize_4bit`` minus its per-call work: the packed data
    is held as a plain tensor (each op on a ``Params4bit`` passes its Python
    ``__torch_function__``), and on CUDA bitsandbytes' kernels are called without the
    custom-op dispatch around them. Together about a third of the host's time per LoRA
    layer; on a GPU the host is what the short layers wait for. An NF4 weight on CUDA
    takes one Triton kernel (``kernels.dequantize_nf4``) for bitsandbytes' three.
    """

    def __init__(self, base: Any) -> None:
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)  # as bitsandbytes' own forward does
        self.state = base.weight.quant_state
        self.packed = base.weight.data  # a plain tensor on the same storage
        self.ptr = self.packed.data_ptr()
        self.impls = _cuda_dequantize_impls() if self.packed.is_cuda else None
        self.fusable: dict[torch.dtype, bool] = {}  # kernels.nf4_available, per dtype

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        state, impls = self.state, self.impls
        fusable = self.fusable.get(dtype)
        if fusable is None:
            fusable = self.fusable[dtype] = kernels.nf4_available(self.packed, state, dtype)
        if fusable and kernels.FUSED_NF4:
            return kernels.dequantize_nf4(self.packed, state, dtype)
        absmax = state.absmax
        if state.nested:
            inner = state.state2
            if impls is not None:
                nested = torch.empty(absmax.shape, dtype=inner.dtype, device=absmax.device)
                impls[0](absmax, inner.absmax, inner.code, inner.blocksize, inner.dtype, out=nested)
            else:
                nested = torch.ops.bitsandbytes.dequantize_blockwise.default(
                    absmax, inner.absmax, inner.code, inner.blocksize, inner.dtype
                )
            absmax = nested.add_(state.offset).float()
        if impls is None:
            return torch.ops.bitsandbytes.dequantize_4bit.default(
                self.packed, absmax, state.blocksize, state.quant_type, state.shape, dtype
            )
        out = torch.empty(state.shape, dtype=dtype, device=self.packed.device)
        impls[1](self.packed, absmax, state.blocksize, state.quant_type, dtype, out=out)
        return out


def _cuda_dequantize_impls() -> tuple[Any, Any] | None:
    """bitsandbytes' CUDA dequantisation functions behind its custom ops, if it has them
    (they are not public API: where they moved, the ops are used as they are)."""
    try:
        from bitsandbytes.backends.cuda import ops
    except Exception:
        return None
    impls = (
        getattr(ops, "_dequantize_blockwise_impl", None),
        getattr(ops, "_dequantize_4bit_impl", None),
    )
    return impls if all(callable(f) for f in impls) else None
