"""``prepare_model`` and ``fuse_lora``: install the fast path's pieces on a model.

**No fp32 upcast.** ``prepare_model`` replaces PEFT's ``prepare_model_for_kbit_training``,
which casts the embeddings, the LM head and the norms to fp32 and so makes the whole residual
stream fp32: twice the activation bytes and checkpoints, for no gain over bf16 autocast.
"""

from __future__ import annotations

import types
from typing import Any

from trainer.fastpath import masking
from trainer.fastpath.attention import add_varlen_kwargs, register_attention
from trainer.fastpath.checkpoint import install_checkpointing
from trainer.fastpath.config import FastPathConfig
from trainer.fastpath.elementwise import compile_elementwise
from trainer.fastpath.embeddings import host_embeddings
from trainer.fastpath.lora import fused_lora_forward, lora_first
from trainer.fastpath.replay import install_rope_replay, replay_residual


def prepare_model(model, cfg: FastPathConfig | None = None):
    """Use instead of ``prepare_model_for_kbit_training``, before ``get_peft_model``.

    Freezes the base, keeps every unquantised weight in its loaded dtype (bf16), installs
    checkpointing and the varlen attention. Returns the same model.
    """
    cfg = cfg or FastPathConfig()
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.host_embeddings:
        host_embeddings(model)
    if cfg.compile_elementwise and next(model.parameters()).is_cuda:
        compile_elementwise(model)
    if cfg.varlen_attention:
        name = register_attention()
        try:
            model.set_attn_implementation(name)
        except (ValueError, AttributeError):
            model.config._attn_implementation = name
        model.get_decoder().register_forward_pre_hook(add_varlen_kwargs, with_kwargs=True)
        masking.install()  # no host read of the positions before each forward
    if cfg.gradient_checkpointing:
        install_checkpointing(model, cfg.offload_checkpoints, cfg.kept_layers)
    if cfg.replay_attention and cfg.varlen_attention:
        for layer in model.modules():
            if type(layer).__name__ in _REPLAY_LAYERS and hasattr(layer, "self_attn"):
                layer.self_attn._fastpath_replay = True
        install_rope_replay(model)
    if cfg.replay_residual:
        for layer in model.modules():
            norm = getattr(layer, "post_attention_layernorm", None)
            if type(layer).__name__ in _RESIDUAL_MLP_LAYERS and norm is not None:
                if not hasattr(norm, "_fastpath_replay"):  # one hook, if prepared twice
                    norm.register_forward_pre_hook(replay_residual)
                norm._fastpath_replay = True
    model.config.use_cache = False
    return model


def fuse_lora(peft_model, cfg: FastPathConfig | None = None):
    """After ``get_peft_model``: give each plain LoRA layer the one-``addmm`` forward."""
    cfg = cfg or FastPathConfig()
    if not cfg.fused_lora:
        return peft_model
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "lora_A"):
            layer: Any = module
            layer._fastpath_forward = layer.forward
            layer.forward = types.MethodType(fused_lora_forward, layer)
            if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
                layer._fastpath_lora_first = lora_first(layer.in_features, layer.out_features)
        if type(module).__name__ not in _RESIDUAL_MLP_LAYERS:
            continue
        down = getattr(getattr(module, "mlp", None), "down_proj", None)
        if cfg.lean_recompute and isinstance(down, LoraLayer):
            setattr(down, "_fastpath_output_unused", True)  # noqa: B010
        attn = getattr(module, "self_attn", None)
        if getattr(attn, "_fastpath_replay", False):
            # A replayed attention reads its parked inputs: the recomputed q, k, v go unused.
            for name in ("q_proj", "k_proj", "v_proj"):
                proj = getattr(attn, name, None)
                if isinstance(proj, LoraLayer):
                    setattr(proj, "_fastpath_replayed", "attention")  # noqa: B010
        norm: Any = getattr(module, "post_attention_layernorm", None)
        o_proj = getattr(attn, "o_proj", None)
        if getattr(norm, "_fastpath_replay", False):
            # The MLP's norm reads the parked residual: the recomputed o_proj goes unused.
            # Without LoRA on o_proj it runs whole (no skip), so nothing is parked either.
            norm._fastpath_replay = isinstance(o_proj, LoraLayer)
            if norm._fastpath_replay:
                setattr(o_proj, "_fastpath_replayed", "residual")  # noqa: B010
    return peft_model


# Decoder layers that end in ``return residual + mlp(norm(h))`` with ``mlp`` ending in
# ``down_proj``: the down projection's output feeds only the layer output, whose value a
# recompute does not need (the add's backward reads neither operand).
_RESIDUAL_MLP_LAYERS = frozenset(
    {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"}
)
# Layers whose attention takes q/k/v straight from their projections through RoPE (linear
# in q and k): a replay needs neither value. Not Qwen3: its q/k norms' backward reads q/k.
_REPLAY_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})
