"""Speed-ups for the QLoRA recipe that leave what it computes unchanged.

The recipe (``trainer.training.recipe``) stays one readable TRL ``SFTTrainer`` run; this module
holds what it calls to make that run fast and lean on a GPU. Each piece computes the
same function as the plain path (same loss up to bf16 rounding, same adapter format),
and each runs for real on the CPU too, where the tests check it:

* **Packing without cross-example attention.** TRL packs examples into rows
  (``packing=True, packing_strategy="bfd"``) and flattens a batch into one row with
  ``position_ids`` restarting at 0 for each example. The ``"fastpath_varlen"``
  attention implementation turns those positions into ``cu_seqlens`` once per forward
  and runs variable-length causal attention, so no token sees another example: on CUDA
  through PyTorch's own FlashAttention-2 varlen kernels (no flash-attn package, no hub
  kernel), elsewhere one causal SDPA call per example. A real workload (most examples a
  few hundred tokens) then keeps the GPU as busy as full 2048-token rows.
* **No fp32 upcast.** ``prepare_model`` replaces PEFT's
  ``prepare_model_for_kbit_training``, which casts the embeddings, the LM head and the
  norms to fp32 and so makes the whole residual stream fp32: twice the activation
  bytes and checkpoints, for no gain over bf16 autocast.
* **Offloaded checkpoints.** Each decoder layer is recomputed in the backward (as with
  gradient checkpointing) and its input is parked in pinned host memory in between,
  copied on a side stream and prefetched one layer ahead, so the layer inputs
  (``layers x tokens x hidden`` bf16, 2 GiB for an 8B model at 4 x 2048) leave the GPU.
* **Host embeddings.** The input-embedding table is frozen and only gathered from:
  it stays in pinned host memory, mapped into the GPU's address space, and the GPU
  gathers the rows it needs over the bus (1 GiB less at 8B, and no host round trip).
* **Fused elementwise ops** (CUDA only). RMSNorm, RoPE and the SiLU gate run eagerly as
  chains of small kernels, RMSNorm in fp32 with copies in and out; ``torch.compile`` of
  the same formulas makes each one kernel forward and one backward.
* **One autograd node per LoRA layer.** PEFT's 4-bit LoRA layer clones the base output,
  scales the LoRA output and adds it (three passes over the largest activations), and
  its backward runs a dropout-backward pass and a separate add. ``fuse_lora`` gives each
  layer ``_LoraLinear``: ``base + scaling * (dropout(x) A^T) B^T`` with the LoRA term
  added into the base GEMM's output in place, and the input gradient's LoRA term added
  into the base one in place. Its dropout mask is drawn from a seed in a Triton kernel
  and never stored (``trainer.fastpath.kernels``): the backward draws it again in the epilogue of
  the small GEMM that adds the LoRA term to the input gradient.
* **Lean recompute.** A Llama-style layer ends in ``residual + down_proj(...)``; when the
  backward recomputes the layer, that output's value is never read, so the down
  projection's GEMM (a quarter of the layer's) is skipped there.
* **Attention replay.** The forward parks each layer's attention inputs, output and
  log-sum-exp in host memory beside the layer input (5 GiB a micro-step at 8B x 8192
  tokens, over the bus while the GPU computes); the recompute runs the attention backward
  on them, so it skips the attention forward, the q/k/v GEMMs and RoPE's forward (its
  backward, the inverse rotation, still runs).
* **Residual replay.** The residual stream after each layer's attention (what the MLP's
  norm reads) is parked too, 64 MiB a layer at 8B x 8192 tokens; the recompute hands the
  norm that value, so the output projection's GEMM is skipped as well (its output only
  feeds the sum the parked value stands for).
* **No needless host waits.** ``cu_seqlens`` costs one small copy to the host per
  forward; the Trainer's NaN filter of the logged loss (a host read after every
  micro-step, which drains the GPU queue) is off, and batches reach the GPU by
  non-blocking copies from pinned memory. NF4 weights are read once (``_NF4``): their
  dequantisation skips ``Params4bit``'s Python ``__torch_function__`` and, on CUDA, the
  custom-op dispatch, host time the GPU waits for in the short layers.
* **NF4 dequantisation in one kernel** (CUDA). ``kernels.dequantize_nf4`` gives
  bitsandbytes' result bit for bit in one pass, where bitsandbytes runs three kernels and
  an add for a double-quantised weight (2,176 dequantisations a step at 8B).

The loss itself needs nothing here: TRL's ``SFTTrainer`` already computes it with a
chunked LM head (``add_fused_lm_head``) that never materialises the full logits.
"""

from __future__ import annotations

import itertools
import sys
import types
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from trainer.fastpath import kernels

ATTN_IMPLEMENTATION = "fastpath_varlen"


@dataclass
class FastPathConfig:
    """Which speed-ups ``prepare_model`` and ``fuse_lora`` apply."""

    varlen_attention: bool = field(
        default=True, metadata={"help": "Packed rows attend within each example only."}
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute each decoder layer in the backward."}
    )
    offload_checkpoints: bool = field(
        default=True, metadata={"help": "Keep the checkpointed layer inputs in host memory."}
    )
    fused_lora: bool = field(
        default=True, metadata={"help": "Add the LoRA term with one addmm (no clone/scale/add)."}
    )
    host_embeddings: bool = field(
        default=True,
        metadata={"help": "Keep the frozen input-embedding table in host memory (-1 GiB at 8B)."},
    )
    compile_elementwise: bool = field(
        default=True,
        metadata={"help": "On CUDA, fuse RMSNorm, RoPE and SiLU*up with torch.compile."},
    )
    lean_recompute: bool = field(
        default=True,
        metadata={
            "help": "In a layer's recompute, skip the down projection's GEMM (its output "
            "only feeds the layer output, which the backward never reads)."
        },
    )
    replay_attention: bool = field(
        default=True,
        metadata={
            "help": "Park each layer's attention inputs, output and log-sum-exp in host "
            "memory with its checkpoint: the recompute skips the q/k/v GEMMs and the "
            "attention forward."
        },
    )
    replay_residual: bool = field(
        default=True,
        metadata={
            "help": "Park the residual stream after each layer's attention with its "
            "checkpoint: the recompute skips the output projection's GEMM."
        },
    )
    sync_free_steps: bool = field(
        default=True,
        metadata={
            "help": "Skip the Trainer's NaN/inf filter of the logged loss (it reads the loss "
            "on the host after every micro-step) and copy batches to the GPU without "
            "blocking: either would stall the GPU queue."
        },
    )

    flat_optimizer: bool = field(
        default=True,
        metadata={
            "help": "Step the 8-bit optimizer on the LoRA weights packed into one buffer: "
            "one kernel and one device wait a step, not one per weight (448 at 8B; "
            "bitsandbytes synchronises after each). The same numbers (trainer.fastpath.flatparams)."
        },
    )

    def optimizer(self, args: Any) -> tuple[Any, dict[str, Any]] | None:
        """``Trainer(optimizer_cls_and_kwargs=...)`` for ``args``; None keeps the Trainer's."""
        import bitsandbytes as bnb
        from transformers import Trainer

        from trainer.fastpath.flatparams import flat_optimizer

        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        eight_bit = isinstance(cls, type) and issubclass(cls, bnb.optim.optimizer.Optimizer8bit)
        if not self.flat_optimizer or not eight_bit or kwargs.get("optim_bits") != 8:
            return None
        return flat_optimizer(cls), kwargs

    def sft_args(self) -> dict[str, Any]:
        """``SFTConfig`` arguments this configuration needs (the recipe merges them in)."""
        args: dict[str, Any] = {}
        if self.varlen_attention:
            args.update(packing=True, packing_strategy="bfd", padding_free=True)
        # Checkpointing is installed by ``prepare_model``; the Trainer must not replace it.
        args["gradient_checkpointing"] = False
        if self.sync_free_steps:
            args["logging_nan_inf_filter"] = False
            # Batches go to the GPU from pinned memory without a blocking copy (3 stalls
            # of the GPU queue at every micro-step's start otherwise).
            args["accelerator_config"] = {"non_blocking": True}
            if self._host_token_count:
                # Counted on the host instead (``HostTokenCount``, from ``callbacks``).
                args["include_num_input_tokens_seen"] = "no"
        return args

    def callbacks(self, model: torch.nn.Module) -> list[Any]:
        """Trainer callbacks this configuration needs, on the model the Trainer trains."""
        return [HostTokenCount(model)] if self._host_token_count else []

    @property
    def _host_token_count(self) -> bool:
        # Only packed padding-free rows are all real tokens, so that their shape counts them.
        return self.sync_free_steps and self.varlen_attention


class HostTokenCount(TrainerCallback):
    """The Trainer's ``num_input_tokens_seen``, counted on the host.

    The Trainer's own count sums each micro-batch on the GPU and reads the sum back once
    the backward is queued, so the host waits for the GPU to drain at every micro-step.
    Packed padding-free rows hold no padding: a micro-batch's tokens are its shape. Only
    training forwards count (evaluation runs without gradients). The checkpoint keeps the
    total, as it keeps the Trainer's own.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.pending = 0
        self.hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and module.training and torch.is_grad_enabled():
            self.pending += ids.numel()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        state.num_input_tokens_seen += self.pending
        self.pending = 0

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.hook.remove()


# ---------------------------------------------------------------- variable-length attention


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Example boundaries of packed rows: a new example starts where positions don't step by 1.

    Rows are concatenated, and each row starts a new example. Returns the int32 cumulative
    lengths (``[0, len0, len0+len1, ..., total]``) and the longest example's length.
    """
    # One copy to the host (a single synchronisation) instead of a nonzero and an item().
    device = position_ids.device
    pos = position_ids.reshape(position_ids.shape[0], -1).to("cpu")
    first = pos[:, :1] - 1
    starts = torch.diff(pos, prepend=first, dim=-1) != 1
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).reshape(-1)
    total = torch.tensor([pos.numel()], dtype=idx.dtype)
    cu = torch.cat([idx, total]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    cu = cu.to(device, non_blocking=True) if device.type == "cuda" else cu.to(device)
    return cu, max_len


class _FlashVarlen(torch.autograd.Function):
    """FlashAttention-2 varlen through ATen's own kernels (GQA native, causal per example)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, scale):  # type: ignore[override]
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_len, ctx.scale = max_len, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            cu,
            cu,
            ctx.max_len,
            ctx.max_len,
            0.0,
            True,
            seed,
            offset,
            scale=ctx.scale,
        )
        return dq, dk, dv, None, None, None


def _per_example_sdpa(q, k, v, cu, scale):
    """The same function on any device: one causal SDPA call per example."""
    bounds = cu.tolist()
    outs = [
        F.scaled_dot_product_attention(
            q[:, a:b].unsqueeze(0),
            k[:, a:b].unsqueeze(0),
            v[:, a:b].unsqueeze(0),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        ).squeeze(0)
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(outs, dim=1)  # (heads, total, head_dim)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention: (batch, heads, seq, dim) in, (batch, seq, heads, dim) out.

    Packed rows go through variable-length attention; anything else through causal SDPA.
    """
    b, h, s, d = query.shape
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None and attention_mask is None and kwargs.get("position_ids") is not None:
        cu, max_len = cu_seqlens_from_position_ids(kwargs["position_ids"].expand(b, -1))
    if cu is None or dropout:
        return _padded_attention(query, key, value, attention_mask, dropout, scaling)
    assert max_len is not None
    flash = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if _replay_head() == "attention":  # a recompute: this layer's attention was parked
        parked, meta = _RECOMPUTE["replay"].popleft()
        out = _AttentionReplay.apply(query, key, value, cu, int(max_len), scaling, meta, *parked)
        return out, None
    current = _LAST["current"]
    park = current is not None and getattr(module, "_fastpath_replay", False)
    if flash:
        q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
        cu32 = cu.to(torch.int32)
        if park and not torch.is_grad_enabled():
            out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
                q, k, v, cu32, cu32, int(max_len), int(max_len), 0.0, True, False, scale=scaling
            )
            current.add_replay((q, k, v, out, lse), ("flash", b, s, seed, offset))
        else:
            out = _FlashVarlen.apply(q, k, v, cu32, int(max_len), scaling)
        return out.view(b, s, h, d), None
    q, k, v = (t.transpose(0, 1).reshape(t.shape[1], b * s, d) for t in (query, key, value))
    out = _per_example_sdpa(q, k, v, cu, scaling)
    if park and not torch.is_grad_enabled():
        current.add_replay((q, k, v, out), ("sdpa", b, s, None, None))
    return out.transpose(0, 1).reshape(b, s, h, d), None


class _AttentionReplay(torch.autograd.Function):
    """A recomputed layer's attention, from what its forward parked: no forward kernel.

    The forward returns the parked output; the backward runs the attention backward on the
    parked inputs, output and log-sum-exp (on the CPU, per-example SDPA recomputed from
    the parked inputs). ``query``, ``key`` and ``value`` only connect the graph: their
    values (the recompute's, never computed) are not read.
    """

    @staticmethod
    def forward(ctx, query, key, value, cu, max_len, scale, meta, *parked):  # type: ignore[override]
        kind, b, s, seed, offset = meta
        ctx.kind, ctx.b, ctx.s, ctx.seed, ctx.offset = kind, b, s, seed, offset
        ctx.max_len, ctx.scale = max_len, scale
        ctx.save_for_backward(cu, *parked)
        out = parked[3]
        h, d = query.shape[1], query.shape[3]
        if kind == "flash":
            return out.view(b, s, h, d)
        return out.transpose(0, 1).reshape(b, s, h, d)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        cu, *parked = ctx.saved_tensors
        b, s = ctx.b, ctx.s
        if ctx.kind == "flash":
            q, k, v, out, lse = parked
            grads = torch.ops.aten._flash_attention_backward(
                grad.reshape(b * s, *grad.shape[2:]).contiguous(),
                q,
                k,
                v,
                out,
                lse,
                cu.to(torch.int32),
                cu.to(torch.int32),
                ctx.max_len,
                ctx.max_len,
                0.0,
                True,
                ctx.seed,
                ctx.offset,
                scale=ctx.scale,
            )
            dq, dk, dv = (g.view(b, s, *g.shape[1:]).transpose(1, 2) for g in grads)
        else:
            q, k, v, _ = (t.detach().requires_grad_(True) for t in parked)
            with torch.enable_grad():
                out = _per_example_sdpa(q, k, v, cu, ctx.scale)
            grad_out = grad.reshape(b * s, *grad.shape[2:]).transpose(0, 1)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
            dq, dk, dv = (g.reshape(g.shape[0], b, s, g.shape[2]).transpose(0, 1) for g in grads)
        return (dq, dk, dv, None, None, None, None) + (None,) * len(parked)


def _rope_grad(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient through ``x * cos + rotate_half(x) * sin``: the inverse rotation."""
    u = grad * sin
    half = u.shape[-1] // 2
    return grad * cos + torch.cat((u[..., half:], -u[..., :half]), dim=-1)


class _RopeReplay(torch.autograd.Function):
    """RoPE in a replayed layer's recompute: the attention reads the parked q and k, so
    the rotated ones are never computed; the backward rotates their gradients back."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):  # type: ignore[override]
        ctx.save_for_backward(cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim))
        return torch.empty_like(q), torch.empty_like(k)

    @staticmethod
    def backward(ctx, grad_q, grad_k):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        grad = _COMPILED.get("rope_grad", _rope_grad) if grad_q.is_cuda else _rope_grad
        return grad(grad_q, cos, sin), grad(grad_k, cos, sin), None, None, None


def _install_rope_replay(model) -> None:
    """Route the model's ``apply_rotary_pos_emb`` through ``_RopeReplay`` while a replayed
    layer is recomputed (whatever it is otherwise: eager or compiled)."""
    modeling: Any = sys.modules[type(model).__module__]
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is None or getattr(rope, "_fastpath_rope_replay", False):
        return

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _replay_head() == "attention" and not (cos.requires_grad or sin.requires_grad):
            return _RopeReplay.apply(q, k, cos, sin, unsqueeze_dim)
        return modeling._fastpath_rope(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._fastpath_rope_replay = True  # type: ignore[attr-defined]
    modeling._fastpath_rope = rope
    modeling.apply_rotary_pos_emb = apply_rotary_pos_emb


def _padded_attention(q, k, v, attention_mask, dropout, scale):
    """Unpacked batches (evaluation, generation): causal SDPA with the 2-D padding mask."""
    s = q.shape[2]
    mask = None
    if attention_mask is not None and attention_mask.dim() == 2:
        causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        mask = causal & attention_mask[:, None, None, -s:].bool()
        mask |= torch.eye(s, dtype=torch.bool, device=q.device)  # no all-masked rows (left padding)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=mask is None and s > 1,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Make ``"fastpath_varlen"`` a transformers attention implementation; return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    # Like FlashAttention: no 4-D mask, only the 2-D padding mask when there is padding.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    return ATTN_IMPLEMENTATION


def _add_varlen_kwargs(module, args, kwargs):
    """Backbone pre-hook: compute ``cu_seqlens`` once per forward, not once per layer."""
    pos = kwargs.get("position_ids")
    if (
        pos is None
        or kwargs.get("attention_mask") is not None
        or kwargs.get("cu_seq_lens_q") is not None
        or kwargs.get("past_key_values") is not None
        or module.config._attn_implementation != ATTN_IMPLEMENTATION
    ):
        return None
    first = kwargs.get("input_ids")
    if first is None:
        first = kwargs.get("inputs_embeds")
    if first is not None:
        pos = pos.expand(first.shape[0], -1)  # positions may come unsqueezed, not expanded
    cu, max_len = cu_seqlens_from_position_ids(pos)
    kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    return args, kwargs


# ---------------------------------------------------------------- offloaded checkpoints


class _Parked:
    """One layer's saved tensors in host memory (its input first), and their copies back.

    Besides the input, a layer's attention can park its inputs, output and log-sum-exp,
    and its MLP norm its input (``add_replay``): the recompute then replays the attention
    and the residual sum instead of computing them.
    """

    def __init__(self, x: torch.Tensor, prev: _Parked | None) -> None:
        self.device, self.prev = x.device, (weakref.ref(prev) if prev is not None else None)
        self.host: list[torch.Tensor] | None = []
        self.gpu: list[torch.Tensor] | None = None
        self.event: torch.cuda.Event | None = None
        self.done = False
        self.replays: list[tuple[int, int, tuple]] = []  # (first index, count, meta)
        self._add((x,))

    def _add(self, tensors: tuple[torch.Tensor, ...]) -> int:
        assert self.host is not None
        first = len(self.host)
        if self.device.type == "cuda":
            stream = _copy_stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for t in tensors:
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    host.copy_(t, non_blocking=True)
                    self.host.append(host)
            for t in tensors:
                t.record_stream(stream)  # keep t's memory until the copy has read it
        else:
            self.host.extend(t.detach() for t in tensors)  # nothing to offload to
        return first

    def add_replay(self, tensors: tuple[torch.Tensor, ...], meta: tuple) -> None:
        self.replays.append((self._add(tensors), len(tensors), meta))

    def prefetch(self) -> None:
        if self.done or self.gpu is not None or self.host is None or self.device.type != "cuda":
            return
        # Allocated from the compute stream's pool, so the blocks are reused there once
        # freed (a copy-stream pool would hold its own blocks: +3 GiB reserved at 8B);
        # the copy starts after the compute work queued so far, which may still read the
        # memory these blocks last held.
        current, stream = torch.cuda.current_stream(self.device), _copy_stream(self.device)
        self.gpu = [torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in self.host]
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for gpu, host in zip(self.gpu, self.host, strict=True):
                gpu.copy_(host, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(stream)
        for gpu in self.gpu:
            gpu.record_stream(stream)  # freed early (an aborted step): not before the copy

    def take(self) -> tuple[torch.Tensor, deque]:
        """The layer input and a queue of (parked attention tensors, meta), on the device."""
        if self.device.type != "cuda":
            assert self.host is not None
            saved, self.host, self.done = self.host, None, True
        else:
            self.prefetch()
            assert self.gpu is not None and self.event is not None
            torch.cuda.current_stream(self.device).wait_event(self.event)
            saved, self.gpu, self.done, self.host = self.gpu, None, True, None
            prev = self.prev() if self.prev is not None else None
            if prev is not None:
                prev.prefetch()  # the backward runs layers in reverse: the one before is next
        replays = deque((tuple(saved[i : i + n]), meta) for i, n, meta in self.replays)
        return saved[0], replays


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_LAST: dict[str, Any] = {"parked": None, "current": None}
# "on" while a layer is recomputed; "replay" holds its parked attention calls, in order.
_RECOMPUTE: dict[str, Any] = {"on": False, "replay": None}


def _replay_kind(entry: tuple) -> str:
    """``"attention"`` or ``"residual"``: what a parked entry (tensors, meta) replays."""
    return "residual" if entry[1][0] == "residual" else "attention"


def _replay_head() -> str | None:
    """What a recompute replays next from its layer's parked tensors, in the forward's
    order: ``"attention"``, ``"residual"``, or None (nothing, or not a recompute)."""
    replay = _RECOMPUTE["replay"]
    return _replay_kind(replay[0]) if replay else None


class _ResidualReplay(torch.autograd.Function):
    """The residual stream after a recomputed layer's attention, as its forward parked it.

    The recompute skips the output projection's GEMM, so the sum it feeds holds no real
    value; the MLP's norm reads the parked one instead, and the sum's gradient is the
    norm input's gradient, unchanged.
    """

    @staticmethod
    def forward(ctx, x, parked):  # type: ignore[override]
        return parked.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def _replay_residual(norm: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a layer's MLP norm (``_fastpath_replay`` on): in an offloaded
    checkpoint's forward, park its input (the residual stream after the attention); in
    the recompute, hand the norm that parked value in place of the recomputed sum."""
    if _replay_head() == "residual":
        (parked,), _ = _RECOMPUTE["replay"].popleft()
        return (_ResidualReplay.apply(args[0], parked), *args[1:])
    current = _LAST["current"]
    if current is not None and norm._fastpath_replay and not torch.is_grad_enabled():
        current.add_replay((args[0],), ("residual",))
    return None


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run a layer without keeping its graph; park its input; recompute it in the backward."""

    @staticmethod
    def forward(ctx, run, x):  # type: ignore[override]
        dev = x.device.type
        ctx.run = run
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.rng_cpu = torch.get_rng_state()
        ctx.rng_dev = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.parked = _Parked(x, _LAST["parked"])
        _LAST["parked"] = _LAST["current"] = ctx.parked
        try:
            return run(x)
        finally:
            _LAST["current"] = None

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, replays = ctx.parked.take()
        x = x.detach().requires_grad_(True)
        ctx.parked = None
        dev = x.device
        devices = [dev.index] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=dev.type):
            torch.set_rng_state(ctx.rng_cpu)
            if ctx.rng_dev is not None:
                torch.cuda.set_rng_state(ctx.rng_dev, dev)
            enabled, dtype = ctx.autocast
            _RECOMPUTE["on"] = True  # the layer's output value itself goes unused now
            _RECOMPUTE["replay"] = replays
            try:
                with torch.enable_grad(), torch.autocast(dev.type, dtype=dtype, enabled=enabled):
                    out = ctx.run(x)
            finally:
                _RECOMPUTE["on"], _RECOMPUTE["replay"] = False, None
            if replays:
                raise RuntimeError(f"a parked {_replay_kind(replays[0])} was not replayed")
        torch.autograd.backward(out, grad)
        return None, x.grad


def offloaded_checkpoint(run, hidden_states, *args, **kwargs):
    """A ``_gradient_checkpointing_func`` for transformers' ``GradientCheckpointingLayer``."""
    if args or kwargs or not torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(
            run, hidden_states, *args, use_reentrant=False, **kwargs
        )
    return _OffloadedCheckpoint.apply(run, hidden_states)


def _install_checkpointing(model, offload: bool) -> None:
    func = offloaded_checkpoint if offload else _non_reentrant_checkpoint
    original = model.gradient_checkpointing_enable

    def gradient_checkpointing_enable(gradient_checkpointing_kwargs=None, **_: Any) -> None:
        # Whoever enables checkpointing later (a Trainer) gets this function, not the default.
        original(gradient_checkpointing_kwargs={"use_reentrant": False})
        for module in model.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = func
        if offload:
            model.enable_input_require_grads()  # the parked input is what carries the gradient

    model.gradient_checkpointing_enable = gradient_checkpointing_enable
    gradient_checkpointing_enable()


def _non_reentrant_checkpoint(run, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


# ---------------------------------------------------------------- model preparation


def prepare_model(model, cfg: FastPathConfig | None = None):
    """Use instead of ``prepare_model_for_kbit_training``, before ``get_peft_model``.

    Freezes the base, keeps every unquantised weight in its loaded dtype (bf16), installs
    checkpointing and the varlen attention. Returns the same model.
    """
    cfg = cfg or FastPathConfig()
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.host_embeddings:
        _host_embeddings(model)
    if cfg.compile_elementwise and next(model.parameters()).is_cuda:
        compile_elementwise(model)
    if cfg.varlen_attention:
        name = register_attention()
        try:
            model.set_attn_implementation(name)
        except (ValueError, AttributeError):
            model.config._attn_implementation = name
        model.get_decoder().register_forward_pre_hook(_add_varlen_kwargs, with_kwargs=True)
    if cfg.gradient_checkpointing:
        _install_checkpointing(model, cfg.offload_checkpoints)
    if cfg.replay_attention and cfg.varlen_attention:
        for layer in model.modules():
            if type(layer).__name__ in _REPLAY_LAYERS and hasattr(layer, "self_attn"):
                layer.self_attn._fastpath_replay = True
        _install_rope_replay(model)
    if cfg.replay_residual:
        for layer in model.modules():
            norm = getattr(layer, "post_attention_layernorm", None)
            if type(layer).__name__ in _RESIDUAL_MLP_LAYERS and norm is not None:
                if not hasattr(norm, "_fastpath_replay"):  # one hook, if prepared twice
                    norm.register_forward_pre_hook(_replay_residual)
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
            layer.forward = types.MethodType(_fused_lora_forward, layer)
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


def _fused_lora_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
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
    if getattr(self, "_fastpath_autograd", True) and _plain_weight(base) is not None:
        drop = self.lora_dropout[name]
        p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
        replayed = getattr(self, "_fastpath_replayed", None)  # "attention" or "residual"
        skip = _RECOMPUTE["on"] and (
            getattr(self, "_fastpath_output_unused", False)
            or (replayed is not None and replayed == _replay_head())
        )
        scaling = self.scaling[name]
        first = getattr(self, "_fastpath_lora_first", (False, False))
        return _LoraLinear.apply(x, lora_A.weight, lora_B.weight, base, scaling, p, skip, first)
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


def _plain_weight(base: torch.nn.Module) -> Any:
    """The base layer's weight if ``_LoraLinear`` can take it: a bias-free bitsandbytes
    4-bit or plain linear layer (else None, and the layer keeps the module path)."""
    weight = getattr(base, "weight", None)
    if weight is None or getattr(base, "bias", None) is not None:
        return None
    state = getattr(weight, "quant_state", None)
    if state is not None:
        if getattr(state, "packing_format_for_cpu", False):
            return None  # bitsandbytes' CPU inference layout: not what dequantize_4bit reads
        return weight
    return weight if type(base) is torch.nn.Linear else None


def _base_weight(base: Any, dtype: torch.dtype) -> torch.Tensor:
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
        nf4 = base.__dict__["_fastpath_nf4"] = _NF4(base)
    return nf4.dequantize(dtype)


class _NF4:
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


def _masked_add(acc: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, scale: float):
    """``acc += grad * mask * scale``: a dropout backward added into an input gradient."""
    return acc.add_(grad * mask * scale)


def _add_dropout_grad(acc, grad, mask, scale: float) -> torch.Tensor:
    """``acc += grad * mask * scale``, compiled into one kernel on CUDA: there ``addcmul_``
    with a bool mask takes a slow dtype-casting kernel (2.5x the bytes' time)."""
    compiled = _COMPILED.get("masked_add") if acc.is_cuda else None
    if compiled is not None:
        try:
            return compiled(acc, grad, mask, scale)
        except Exception:  # a compiler failure costs speed, never the job
            _COMPILED.pop("masked_add", None)
    return acc.addcmul_(grad, mask, value=scale)


class _LoraLinear(torch.autograd.Function):
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
    never stored: the backward's epilogue draws it again while adding the LoRA term.
    Elsewhere it is PyTorch's own (``native_dropout``, the kernel ``nn.Dropout`` runs).
    Either way a checkpointed layer's recompute draws the same mask (the seed comes from
    the CPU generator, whose state the checkpoint restores).
    """

    @staticmethod
    def forward(ctx, x, weight_a, weight_b, base, scaling, p, skip=False, first=(False, False)):  # type: ignore[override]
        dev = x.device.type
        dtype = (
            torch.get_autocast_dtype(dev)
            if torch.is_autocast_enabled(dev)
            else getattr(base, "compute_dtype", None) or x.dtype
        )
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        mask, seed = None, None
        xd = x2
        if p > 0 and kernels.available(x2):
            seed = kernels.new_seed()  # a recompute draws it again: the same mask
            xd = kernels.dropout(x2, p, seed)
        elif p > 0:
            xd, mask = torch.native_dropout(x2, p, True)
        a, b = weight_a.to(dtype), weight_b.to(dtype)
        low = torch.mm(xd, a.t())
        if skip:  # a recompute whose output only feeds the layer's (unused) output
            out = x2.new_empty(x2.shape[0], weight_b.shape[0])
        elif first[0]:  # the base GEMM's epilogue adds into the LoRA term
            out = torch.mm(low, b.t() * scaling).addmm_(x2, _base_weight(base, dtype).t())
        else:
            out = torch.mm(x2, _base_weight(base, dtype).t()).addmm_(low, b.t(), alpha=scaling)
        ctx.base, ctx.scaling, ctx.p, ctx.seed, ctx.first = base, scaling, p, seed, first
        ctx.shape, ctx.x_dtype = shape, x.dtype
        ctx.ab_dtypes = (weight_a.dtype, weight_b.dtype)
        ctx.save_for_backward(xd, mask, low, a, b)
        return out.view(*shape[:-1], out.shape[-1]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xd, mask, low, a, b = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(a.dtype)
        g_low = torch.mm(g, b).mul_(s)  # d(low): (tokens, r)
        grad_b = torch.mm(g.t(), low).mul_(s) if ctx.needs_input_grad[2] else None
        grad_a = torch.mm(g_low.t(), xd) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = _base_weight(ctx.base, a.dtype)
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
                    grad_x = _add_dropout_grad(grad_x, torch.mm(g_low, a), mask, 1 / (1 - ctx.p))
            grad_x = grad_x.view(ctx.shape).to(ctx.x_dtype)
        da, db = ctx.ab_dtypes
        grad_a = grad_a.to(da) if grad_a is not None else None
        grad_b = grad_b.to(db) if grad_b is not None else None
        return grad_x, grad_a, grad_b, None, None, None, None, None


def lora_first(in_features: int, out_features: int) -> tuple[bool, bool]:
    """Whether ``_LoraLinear`` writes the LoRA term first and lets the base GEMM add into
    it (the GEMM's epilogue reads it, behind the GEMM's compute), in the forward and in
    the input gradient; otherwise the base GEMM writes and a separate pass over the output
    adds the LoRA term. Measured on an H200 at 8192 tokens (``bench/lora_kernels.py``):
    first pays for the MLP's large GEMMs in the forward (1.02-1.05x) and for every input
    gradient but a narrow projection's (1.01-1.13x); it costs where the base GEMM is short
    (q/o forward 0.95x, k/v 0.93-0.97x)."""
    return in_features * out_features >= 3 * 2**24, 4 * out_features > in_features


# ---------------------------------------------------------------- host embeddings


class HostEmbedding(torch.nn.Module):
    """A frozen embedding table in host memory.

    On CUDA the table is pinned and mapped into the GPU's address space, so the gather
    runs on the GPU and reads only the rows it needs over the bus: no copy of the ids to
    the host, no synchronisation, no host-side gather. Where mapping is not possible
    (or on the CPU) the rows are gathered on the host and copied over. The table is a
    plain tensor, not a parameter, so ``model.device`` stays the GPU.
    """

    def __init__(self, embedding: torch.nn.Embedding, mapped: bool = True) -> None:
        super().__init__()
        self.device = embedding.weight.device
        self.table = embedding.weight.detach().to("cpu")
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = self.table.shape
        self.mapped: torch.Tensor | None = None
        if mapped and self.device.type == "cuda":
            self.table = self.table.pin_memory()
            self.mapped = _mapped_table(self.table, self.device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.mapped is not None and input_ids.is_cuda:
            return F.embedding(input_ids, self.mapped, self.padding_idx)
        rows = F.embedding(input_ids.cpu(), self.table, self.padding_idx)
        return rows.to(self.device)


class _DeviceView:
    """``__cuda_array_interface__`` of a pinned host tensor (mapped memory, one address)."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host  # kept alive as long as the device view
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape),
            "typestr": "<i2",
            "data": (host.data_ptr(), False),
            "version": 3,
        }


def _mapped_table(table: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The pinned ``table`` as a CUDA tensor over the same memory, checked; None if not."""
    if table.dtype not in (torch.bfloat16, torch.float16) or not table.is_contiguous():
        return None
    try:
        view = torch.as_tensor(_DeviceView(table.view(torch.int16)), device=device)
        view = view.view(table.dtype)
        ids = torch.tensor([0, 1, table.shape[0] // 2, table.shape[0] - 1])
        got = F.embedding(ids.to(device), view).cpu()
        if view.device != device or not torch.equal(got, F.embedding(ids, table)):
            return None
        return view
    except Exception:  # no unified addressing here: gather on the host instead
        return None


def _host_embeddings(model) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    if isinstance(emb, torch.nn.Embedding) and emb.weight.is_cuda and not tied:
        model.set_input_embeddings(HostEmbedding(emb))
        del emb
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- fused elementwise (CUDA)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` as a function of tensors, for one compiled graph."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _COMPILED["rms"](x, self.weight, self.variance_epsilon)


def _mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_COMPILED["silu_mul"](self.gate_proj(x), self.up_proj(x)))


_COMPILED: dict[str, Any] = {}


def compile_elementwise(model) -> None:
    """Give RMSNorm and SiLU-gated MLP modules, and the model's RoPE, compiled kernels.

    The formulas are transformers' own (Llama, Mistral, Qwen2 share them); dynamic shapes,
    so packed batches of any length reuse one graph. The originals stay reachable as
    ``_fastpath_eager_forward`` and ``_fastpath_eager_rope``.
    """
    if not _COMPILED:
        _COMPILED["rms"] = torch.compile(_rms_norm, dynamic=True)
        _COMPILED["silu_mul"] = torch.compile(_silu_mul, dynamic=True)
        _COMPILED["masked_add"] = torch.compile(_masked_add, dynamic=True)
        _COMPILED["rope_grad"] = torch.compile(_rope_grad, dynamic=True)
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module._fastpath_eager_forward = module.forward
            module.forward = types.MethodType(_norm_forward, module)
        elif (
            all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj"))
            and getattr(getattr(module, "config", None), "hidden_act", None) == "silu"
        ):
            module._fastpath_eager_forward = module.forward
            module.forward = types.MethodType(_mlp_forward, module)
    modeling: Any = sys.modules[type(model).__module__]
    rope = getattr(modeling, "apply_rotary_pos_emb", None)
    if rope is not None and not hasattr(modeling, "_fastpath_eager_rope"):
        replay_aware = getattr(rope, "_fastpath_rope_replay", False)
        eager = modeling._fastpath_rope if replay_aware else rope
        modeling._fastpath_eager_rope = eager
        modeling._fastpath_compiled_rope = torch.compile(eager, dynamic=True)
        if replay_aware:  # ``_install_rope_replay``'s function stays in front
            modeling._fastpath_rope = modeling._fastpath_compiled_rope
        else:
            modeling.apply_rotary_pos_emb = modeling._fastpath_compiled_rope
