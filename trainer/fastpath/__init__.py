"""Speed-ups for the QLoRA recipe that leave what it computes unchanged.

The recipe (``trainer.training.recipe``) stays one readable TRL ``SFTTrainer`` run; this
package holds what it calls to make that run fast and lean on a GPU: ``prepare_model`` before
``get_peft_model``, ``fuse_lora`` after it, both driven by a ``FastPathConfig``. Each piece
computes the same function as the plain path (same loss up to bf16 rounding, same adapter
format), and each runs for real on the CPU too, where the tests check it. One module a
technique:

* ``config``: ``FastPathConfig`` (which pieces run, the ``SFTConfig`` arguments and Trainer
  callbacks they need) and ``HostTokenCount`` (no host wait for the token count).
* ``preparation``: ``prepare_model`` (no fp32 upcast; installs the pieces below) and
  ``fuse_lora``.
* ``attention``: packed rows without cross-example attention (FlashAttention-2 varlen on
  CUDA, per-example SDPA elsewhere), and the attention replayed from parked tensors.
* ``masking``: transformers' mask preparation for that attention without its host read of
  the positions.
* ``parking``: a layer's saved tensors in pinned host memory, copied on a side stream and
  prefetched one layer ahead.
* ``checkpoint``: offloaded checkpoints, and the lean recompute that skips what the backward
  never reads.
* ``replay``: the RoPE and residual replays of a recomputed layer.
* ``lora``: one autograd node per LoRA layer, its dropout mask drawn from a seed.
* ``nf4``: NF4 base weights read once and dequantised in one kernel on CUDA.
* ``embeddings``: the frozen input-embedding table in host memory, mapped for the GPU.
* ``elementwise``: RMSNorm, RoPE and the SiLU gate compiled (CUDA).
* ``kernels``: the Triton kernels (dropout drawn from a seed, NF4 dequantisation).
* ``flatparams``: the 8-bit optimizer stepping the LoRA weights packed into one buffer.

The loss itself needs nothing here: TRL's ``SFTTrainer`` already computes it with a chunked
LM head (``add_fused_lm_head``) that never materialises the full logits.
"""

from __future__ import annotations

from trainer.fastpath.attention import (
    ATTN_IMPLEMENTATION,
    cu_seqlens_from_position_ids,
    register_attention,
    varlen_attention_forward,
)
from trainer.fastpath.checkpoint import offloaded_checkpoint
from trainer.fastpath.config import FastPathConfig, HostTokenCount
from trainer.fastpath.elementwise import compile_elementwise
from trainer.fastpath.embeddings import HostEmbedding
from trainer.fastpath.lora import lora_first
from trainer.fastpath.preparation import fuse_lora, prepare_model

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FastPathConfig",
    "HostEmbedding",
    "HostTokenCount",
    "compile_elementwise",
    "cu_seqlens_from_position_ids",
    "fuse_lora",
    "lora_first",
    "offloaded_checkpoint",
    "prepare_model",
    "register_attention",
    "varlen_attention_forward",
]
