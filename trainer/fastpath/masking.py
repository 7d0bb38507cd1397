"""transformers' mask preparation for the varlen attention, without its host read.

Before each decoder forward, ``transformers.masking_utils`` looks for packed rows in
``position_ids`` (``find_packed_sequence_indices``) and tests the answer on the host: a
synchronisation after the embedding and before the first layer of every micro-step, after
which the GPU idles until the host has issued the next kernels (run 30 counted it among the
12 host reads a micro-step; runs 30 and 42 put 4-9 ms of late launches at each micro-step's
start).

The varlen attention never uses what that check builds. Its mask function
(``flash_attention_mask``) ignores the packed-sequence mask, and the examples' boundaries
come as ``cu_seq_lens`` (TRL's padding-free collator computes them on the host) or from
``position_ids`` (``attention.cu_seqlens_from_position_ids``). So for models on that
implementation only, the preparation runs as if no ``position_ids`` were given; every other
implementation (SDPA, eager, flex), which builds its mask from the packed-sequence mask, is
untouched. ``SKIP_PACKED_CHECK = False`` (the bench's ``-packedcheck``) restores the read.
"""

from __future__ import annotations

import functools
import inspect

from transformers import masking_utils

from trainer.fastpath.attention import ATTN_IMPLEMENTATION

SKIP_PACKED_CHECK = True


def install() -> bool:
    """Wrap ``masking_utils._preprocess_mask_arguments`` once; False where this
    transformers has no such function or another signature (the check then stays)."""
    original = getattr(masking_utils, "_preprocess_mask_arguments", None)
    if original is None or getattr(original, "_fastpath", False):
        return original is not None
    signature = inspect.signature(original)
    if not {"config", "position_ids"} <= signature.parameters.keys():
        return False

    @functools.wraps(original)
    def preprocess(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        config = bound.arguments["config"]
        if (
            SKIP_PACKED_CHECK
            and getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
        ):
            bound.arguments["position_ids"] = None
        return original(*bound.args, **bound.kwargs)

    preprocess._fastpath = True  # type: ignore[attr-defined]
    masking_utils._preprocess_mask_arguments = preprocess
    return True
