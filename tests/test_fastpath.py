"""The GPU fast path computes what the reference QLoRA recipe computes.

A tiny random Llama (hidden 128, 2 heads, 1 KV head, 2 layers) is loaded in NF4 through
bitsandbytes, which runs on the CPU, so the fast path's packing, masking, checkpointing
and fused LoRA run here for real; only the CUDA FlashAttention kernel is GPU-only.
"""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from trainer import fastpath  # noqa: E402
from trainer.config import ALL_PROJECTIONS  # noqa: E402
from trainer.fastpath import attention, elementwise, kernels, lora, nf4, parking  # noqa: E402

VOCAB = 256
RANK = 8


# The tiny decoder's dimensions, whichever family (hidden 128, 2 heads, 1 KV head, 2 layers).
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory):
    """A tiny random Qwen 2: its q/k/v projections carry biases (random, not zero)."""
    path = tmp_path_factory.mktemp("tiny-qwen")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                assert proj.bias is not None
                proj.bias.normal_(0, 0.5)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def _load(
    path,
    *,
    fast: bool,
    offload: bool = True,
    device: str = "cpu",
    rank: int = RANK,
    targets=ALL_PROJECTIONS,
    kept: int = 0,
):
    """The recipe's loading path: NF4, double quantisation, bf16 compute; then LoRA."""
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb, dtype=torch.bfloat16, device_map=device
    )
    cfg = fastpath.FastPathConfig(offload_checkpoints=offload, kept_layers=kept)
    if fast:
        fastpath.prepare_model(model, cfg)
    else:
        model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        init_lora_weights=False,  # random B as well, so the LoRA term is not zero
    )
    torch.manual_seed(1)
    model = get_peft_model(model, lora)
    if fast:
        fastpath.fuse_lora(model, cfg)
    return model


def _examples(lengths, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


def _pack(examples):
    """What TRL's padding-free collator hands the model: one row, positions restart."""
    ids = torch.cat(examples)[None]
    pos = torch.cat([torch.arange(len(e)) for e in examples])[None]
    labels = ids.clone()
    labels[pos == 0] = -100
    return ids, pos, labels


def _per_example_losses(logits, ids, lengths):
    """Mean next-token loss of each example of a packed row."""
    out, start = [], 0
    for n in lengths:
        lg, tgt = logits[0, start : start + n - 1].float(), ids[0, start + 1 : start + n]
        out.append(F.cross_entropy(lg, tgt))
        start += n
    return torch.stack(out)


def _lora_grads(model):
    return torch.cat(
        [p.grad.float().flatten() for n, p in model.named_parameters() if "lora_" in n]
    )


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    cu, longest = fastpath.cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 9, 15, 18]
    assert cu.dtype == torch.int32
    assert longest == 6


def test_packed_row_gives_each_examples_own_loss(tiny_model_dir):
    model = _load(tiny_model_dir, fast=True).eval()
    lengths = [7, 19, 4, 12]
    examples = _examples(lengths)
    with torch.no_grad():
        ids, pos, _ = _pack(examples)
        packed = _per_example_losses(model(input_ids=ids, position_ids=pos).logits, ids, lengths)
        alone = torch.stack(
            [
                _per_example_losses(model(input_ids=e[None]).logits, e[None], [len(e)])[0]
                for e in examples
            ]
        )
        torch.testing.assert_close(packed, alone, rtol=2e-2, atol=2e-2)

        # Another example's tokens change nothing for the others: no cross-example attention.
        changed = list(examples)
        changed[1] = torch.randint(
            0, VOCAB, (lengths[1],), generator=torch.Generator().manual_seed(9)
        )
        ids2, pos2, _ = _pack(changed)
        repacked = _per_example_losses(
            model(input_ids=ids2, position_ids=pos2).logits, ids2, lengths
        )
    assert not torch.allclose(repacked[1], packed[1])
    keep = [0, 2, 3]
    torch.testing.assert_close(repacked[keep], packed[keep], rtol=1e-3, atol=1e-3)


def test_the_mask_preparation_skips_its_host_read_of_packed_positions(tiny_model_dir, monkeypatch):
    """transformers tests on the host whether ``position_ids`` hold packed rows before each
    decoder forward (a synchronisation at every micro-step's start). The varlen attention
    never uses that answer, so the fast path's model forwards without it and its logits do
    not change; a model on another attention (SDPA, the reference recipe's) still checks."""
    from transformers import masking_utils

    from trainer.fastpath import masking

    calls = []
    check = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(
        masking_utils, "find_packed_sequence_indices", lambda p: calls.append(p) or check(p)
    )
    fast = _load(tiny_model_dir, fast=True).eval()
    ids, pos, _ = _pack(_examples([7, 19, 4]))
    with torch.no_grad():
        skipped = fast(input_ids=ids, position_ids=pos).logits
        assert calls == []
        monkeypatch.setattr(masking, "SKIP_PACKED_CHECK", False)
        checked = fast(input_ids=ids, position_ids=pos).logits
        assert len(calls) == 1
        torch.testing.assert_close(skipped, checked, rtol=0, atol=0)
        monkeypatch.setattr(masking, "SKIP_PACKED_CHECK", True)
        reference = _load(tiny_model_dir, fast=False).eval()
        reference(input_ids=ids, position_ids=pos, use_cache=False)  # as TRL trains
    assert len(calls) == 2 and calls[1].shape == pos.shape


@pytest.mark.parametrize(
    ("model", "offload", "kept"),
    [
        ("llama", True, 0),
        ("llama", False, 0),
        ("llama", True, 1),
        ("llama", True, 2),
        ("qwen", True, 0),  # biased q/k/v: the same LoRA node, the bias in its epilogue
        ("qwen", True, 1),
    ],
)
def test_fast_path_loss_and_grads_match_reference(request, model, offload, kept):
    tiny_model_dir = request.getfixturevalue(
        "tiny_qwen_dir" if model == "qwen" else "tiny_model_dir"
    )
    lengths = [16, 16, 16]
    examples = _examples(lengths, seed=3)
    batch = torch.stack(examples)

    ref = _load(tiny_model_dir, fast=False).train()
    ref_loss = ref(input_ids=batch, labels=batch).loss
    ref_loss.backward()

    fast = _load(tiny_model_dir, fast=True, offload=offload, kept=kept).train()
    # The same unpacked batch ...
    fast_loss = fast(input_ids=batch, labels=batch).loss
    # ... and packed into one row, as the fast recipe trains it.
    ids, pos, labels = _pack(examples)
    packed_loss = fast(input_ids=ids, position_ids=pos, labels=labels).loss
    packed_loss.backward()

    torch.testing.assert_close(fast_loss, ref_loss, rtol=2e-2, atol=0)
    torch.testing.assert_close(packed_loss, ref_loss, rtol=2e-2, atol=0)
    g_ref, g_fast = _lora_grads(ref), _lora_grads(fast)
    assert g_fast.abs().sum() > 0
    assert F.cosine_similarity(g_ref, g_fast, dim=0) > 0.98
    assert (g_fast - g_ref).norm() / g_ref.norm() < 0.15


def test_kept_layers_change_no_loss_or_gradient(tiny_model_dir, monkeypatch):
    """A budget that holds them keeps the last layers' activations: those layers are not
    checkpointed (nothing parked, no recompute), and the loss and every LoRA gradient are
    bit-identical to every layer checkpointed, LoRA dropout included."""
    parked = []

    class Counted(parking.Parked):
        def __init__(self, x, prev):
            parked.append(x)
            super().__init__(x, prev)

    monkeypatch.setattr(parking, "Parked", Counted)
    ids, pos, labels = _pack(_examples([9, 14, 5], seed=6))
    runs = []
    for kept in (0, 1, 2):
        model = _load(tiny_model_dir, fast=True, kept=kept).train()
        layers = model.base_model.model.model.layers
        assert [layer.gradient_checkpointing for layer in layers] == [i < 2 - kept for i in (0, 1)]
        for layer in model.modules():
            if hasattr(layer, "lora_dropout"):
                layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
        parked.clear()
        torch.manual_seed(11)
        loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
        loss.backward()
        assert len(parked) == 2 - kept  # one parked input a checkpointed layer
        runs.append((loss.detach(), _lora_grads(model)))
    for loss, grads in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grads, runs[0][1])


def test_padded_batch_falls_back_to_masked_attention(tiny_model_dir):
    """Unpacked padded batches (evaluation) keep the padding out of attention."""
    model = _load(tiny_model_dir, fast=True).eval()
    a, b = _examples([10, 6], seed=4)
    ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros(2, 10, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :6], mask[1, :6] = b, 1
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=b[None]).logits
    torch.testing.assert_close(padded[1, :6].float(), alone[0].float(), rtol=2e-2, atol=2e-2)


class _DrawnMask(torch.nn.Module):
    """Dropout with the mask ``trainer.fastpath.kernels`` draws for the seed that follows
    ``torch.manual_seed(7)``: PEFT's forward with the fast path's mask, as a reference."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        torch.manual_seed(7)
        ones = torch.ones(x.numel() // x.shape[-1], x.shape[-1], device=x.device, dtype=x.dtype)
        keep = kernels.dropout(ones, self.p, kernels.new_seed()) != 0
        return x * keep.view(x.shape) / (1 - self.p)


def _layer_matches_peft(layer, x, dropout: float) -> None:
    """The fast path's layer (one autograd node) against PEFT's own forward, same mask."""
    drawn = dropout and kernels.available(x.detach().reshape(-1, x.shape[-1]))
    peft_dropout = _DrawnMask(dropout) if drawn else torch.nn.Dropout(dropout)
    weights = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    runs = []
    for forward in (layer.forward, layer._fastpath_forward):
        fast = forward == layer.forward
        layer.lora_dropout["default"] = (
            (torch.nn.Dropout(dropout) if fast else peft_dropout)
            if dropout
            else torch.nn.Identity()
        )
        torch.manual_seed(7)  # the same dropout mask for both
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = forward(x)
        out.float().square().sum().backward()
        runs.append([out.detach(), x.grad, *(w.grad for w in weights)])
        x.grad = None
        for w in weights:
            w.grad = None
    assert "LoraLinear" in type(layer(x).grad_fn).__name__
    for got, want in zip(*runs, strict=True):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2e-2


@pytest.mark.parametrize("first", [(False, False), (True, True)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_lora_layer_matches_peft(tiny_model_dir, dropout, first):
    """Either order of the LoRA term and the base GEMM (``fastpath.lora_first`` picks
    one per layer shape) computes PEFT's layer."""
    model = _load(tiny_model_dir, fast=True).train()
    layers = model.base_model.model.model.layers
    for layer in (layers[0].mlp.up_proj, layers[1].self_attn.k_proj):
        layer._fastpath_lora_first = first
        x = torch.randn(2, 5, 128, dtype=torch.bfloat16, requires_grad=True)
        _layer_matches_peft(layer, x, dropout)


@pytest.mark.parametrize("first", [(False, False), (True, True)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_biased_projection_takes_the_one_node_layer(tiny_qwen_dir, dropout, first):
    """A frozen bias (Qwen 2's q/k/v) joins the base GEMM in the one-node layer, in either
    order of the LoRA term: PEFT's output and gradients, the bias untouched by training."""
    model = _load(tiny_qwen_dir, fast=True).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    bias = layer.get_base_layer().bias
    assert bias is not None and not bias.requires_grad and bias.abs().sum() > 0
    assert lora.plain_weight(layer.get_base_layer()) is not None
    layer._fastpath_lora_first = first
    x = torch.randn(2, 5, 128, dtype=torch.bfloat16, requires_grad=True)
    _layer_matches_peft(layer, x, dropout)
    assert bias.grad is None


def test_lora_term_order_follows_the_measured_shapes():
    # Llama 3.1 8B: q/o, k/v, gate/up, down (bench/lora_kernels.py on the H200).
    assert fastpath.lora_first(4096, 4096) == (False, True)
    assert fastpath.lora_first(4096, 1024) == (False, False)
    assert fastpath.lora_first(4096, 14336) == (True, True)
    assert fastpath.lora_first(14336, 4096) == (True, True)


def _lean_and_replay_runs(model, monkeypatch, device="cpu"):
    """Loss, LoRA gradients and dequantisations with (lean + attention and residual
    replay), (lean + residual replay), (lean), (neither)."""
    downs = [m for n, m in model.named_modules() if n.endswith("mlp.down_proj")]
    attns = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    norms = [m for n, m in model.named_modules() if n.endswith("post_attention_layernorm")]
    assert len(downs) == 2 and all(d._fastpath_output_unused for d in downs)
    assert len(attns) == 2 and all(
        a._fastpath_replay and a.q_proj._fastpath_replayed == "attention" for a in attns
    )
    assert len(norms) == 2 and all(m._fastpath_replay for m in norms)
    assert all(a.o_proj._fastpath_replayed == "residual" for a in attns)
    for layer in model.modules():
        if hasattr(layer, "lora_dropout"):
            layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    ids, pos, labels = (t.to(device) for t in _pack(_examples([9, 14, 5], seed=6)))
    dequantised, rotated_back = [], []
    real, real_rope_grad = nf4.base_weight, elementwise.rope_grad
    monkeypatch.setattr(
        nf4, "base_weight", lambda base, dt: dequantised.append(base) or real(base, dt)
    )
    monkeypatch.setattr(
        elementwise, "rope_grad", lambda *a: rotated_back.append(a[0]) or real_rope_grad(*a)
    )
    runs = []
    for lean, replay, residual in (
        (True, True, True),
        (True, False, True),
        (True, False, False),
        (False, False, False),
    ):
        for d in downs:
            d._fastpath_output_unused = lean
        for a in attns:
            a._fastpath_replay = replay
        for m in norms:
            m._fastpath_replay = residual
        dequantised.clear()
        rotated_back.clear()
        torch.manual_seed(11)
        loss = model(input_ids=ids, position_ids=pos, labels=labels).loss
        loss.backward()
        # A replayed layer skips RoPE's forward and rotates q's and k's gradients back.
        if device == "cpu":
            assert len(rotated_back) == (2 * 2 if replay else 0)
        runs.append((loss.detach(), _lora_grads(model), len(dequantised)))
        model.zero_grad(set_to_none=True)
    return runs


def test_lean_recompute_and_replays_change_no_gradient(tiny_model_dir, monkeypatch):
    """The recompute skips the down projection's GEMM (its output only feeds the layer
    output); with the residual after the attention parked, the output projection's; with
    the attention parked and replayed, the q/k/v GEMMs too. The loss and every LoRA
    gradient are bit-identical to the full recompute."""
    model = _load(tiny_model_dir, fast=True).train()
    runs = _lean_and_replay_runs(model, monkeypatch)
    (loss_all, g_all, n_all), (loss_res, g_res, n_res), (loss_lean, g_lean, n_lean) = runs[:3]
    loss_full, g_full, n_full = runs[3]
    assert n_full - n_lean == 2  # one dequantisation (and GEMM) fewer in each of 2 layers
    assert n_lean - n_res == 2  # o_proj's
    assert n_res - n_all == 3 * 2  # and q, k and v's too
    for loss, g in ((loss_all, g_all), (loss_res, g_res), (loss_lean, g_lean)):
        assert torch.equal(loss, loss_full) and torch.equal(g, g_full)


_INTERPRETED_DROPOUT = """
import torch
from trainer.fastpath import checkpoint, kernels, lora

assert kernels.INTERPRET
torch.manual_seed(0)
p, seed = 0.25, 1234
ones = torch.ones(300, 512)
drawn = kernels.dropout(ones, p, seed)
keep = drawn != 0
assert torch.equal(drawn[keep], torch.full_like(drawn[keep], 1 / (1 - p)))
assert abs(keep.float().mean().item() - (1 - p)) < 0.01, keep.float().mean()
# One Philox call draws for 8 neighbours: each takes its own bits (neighbours agree on
# keep/drop as often as independent draws do, p**2 + (1-p)**2).
for lag in (1, 2, 4, 7):
    agree = (keep[:, lag:] == keep[:, :-lag]).float().mean().item()
    assert abs(agree - (p**2 + (1 - p) ** 2)) < 0.01, (lag, agree)
assert torch.equal(kernels.dropout(ones, p, seed), drawn)
assert not torch.equal(kernels.dropout(ones, p, seed + 1), drawn)
# The mask belongs to the element index, not to the shape it is drawn in.
assert torch.equal(kernels.dropout(torch.ones(2400, 64), p, seed).view(300, 512), drawn)
x = torch.randn(300, 512)
torch.testing.assert_close(kernels.dropout(x, p, seed), x * keep / (1 - p))

# The backward's epilogue draws the same mask again.
acc, g, a = torch.randn(300, 512), torch.randn(300, 8), torch.randn(8, 512)
want = acc + (g @ a) * keep / (1 - p)
torch.testing.assert_close(kernels.add_masked_lora_grad(acc, g, a, p, seed), want)

# The small GEMMs that draw the mask as they read the input: the LoRA term (tokens, rank)
# and A's gradient (rank, in), against the written dropped copy; rows and a rank that
# leave tiles part-empty, and tokens split over several programs.
for rows, width, rank in ((300, 512, 8), (70, 136, 12), (1000, 64, 64)):
    x, a, g = torch.randn(rows, width), torch.randn(rank, width), torch.randn(rows, rank)
    dropped = kernels.dropout(x, p, seed)
    close = dict(rtol=1e-4, atol=1e-4)  # float32 sums in another order; values up to 1e2
    torch.testing.assert_close(kernels.dropout_mm(x, a, p, seed), dropped @ a.t(), **close)
    kernels.DROPOUT_MM_T_PROGRAMS = 4
    torch.testing.assert_close(kernels.dropout_mm_t(g, x, p, seed), g.t() @ dropped, **close)
    kernels.DROPOUT_MM_T_PROGRAMS = 512
    torch.testing.assert_close(kernels.dropout_mm_t(g, x, p, seed), g.t() @ dropped, **close)
    assert not torch.allclose(kernels.dropout_mm(x, a, p, seed + 1), dropped @ a.t())

# The one-node LoRA layer on a plain linear base: the kernels' path against autograd over
# the same formula with the drawn mask, and a checkpoint's recompute draws that mask again.
base = torch.nn.Linear(64, 48, bias=False)
A = torch.randn(8, 64, requires_grad=True)
B = torch.randn(48, 8, requires_grad=True)
x0 = torch.randn(2, 20, 64)

def grads(run):
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(3)
    run(x).square().sum().backward()
    out = [t.grad.clone() for t in (x, A, B)]
    for t in (A, B):
        t.grad = None
    return out

def node(h, first=(False, False)):
    return lora.LoraLinear.apply(h, A, B, base, 2.0, 0.3, False, first)

def reference(h):
    torch.manual_seed(3)
    mask = kernels.dropout(torch.ones(40, 64), 0.3, kernels.new_seed()).view(2, 20, 64) != 0
    return base(h) + 2.0 * ((h * mask / 0.7) @ A.t()) @ B.t()

want = grads(reference)
first = lambda h: node(h, (True, True))  # noqa: E731  (the LoRA term written first)
runs = []
for fused in (True, False):  # the mask drawn inside A's GEMMs, or the dropped copy written
    kernels.FUSED_DROPOUT_MM = fused
    runs += [grads(node), grads(first), grads(lambda h: checkpoint.offloaded_checkpoint(node, h))]
for got in runs:
    for g_got, g_want in zip(got, want):  # gradients reach 1e5: float32 rounding, scaled
        atol = 1e-6 * g_want.abs().max().item()
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=atol)
print("ok")
"""


def _interpret(script: str) -> None:
    """Run ``script`` under Triton's interpreter (a fresh process: it is read at import)."""
    pytest.importorskip("triton")
    import os
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_dropout_kernels_in_the_triton_interpreter():
    """The Triton dropout (no stored mask) and the backward epilogue that draws the mask
    again, run by Triton's interpreter on the CPU (float32): the kept share is 1 - p, the
    mask depends only on seed and element, the epilogue's mask is the forward's, and the
    LoRA node's gradients match autograd over the same mask, through a recompute too."""
    _interpret(_INTERPRETED_DROPOUT)


_INTERPRETED_NF4 = """
import bitsandbytes.functional as F
import torch
from trainer.fastpath import kernels

torch.manual_seed(0)
# Shapes whose last 64-weight block is short (7000 = 109 x 64 + 24), nested and not.
for shape, nested in (((48, 64), True), ((100, 70), True), ((100, 70), False)):
    w = torch.randn(shape) * torch.rand(shape[0], 1) * 4
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
    assert state.nested == nested and kernels.nf4_available(packed, state, torch.float32)
    want = F.dequantize_4bit(packed, state).float()
    got = kernels.dequantize_nf4(packed, state, torch.float32)
    assert got.shape == want.shape and torch.equal(got, want), (shape, nested)
packed, fp4 = F.quantize_4bit(torch.randn(8, 64), quant_type="fp4")  # bitsandbytes' own
assert not kernels.nf4_available(packed, fp4, torch.float32)
print("ok")
"""


def test_nf4_kernel_in_the_triton_interpreter():
    """The one-kernel NF4 dequantisation equals bitsandbytes' bit for bit, with double
    quantisation and without, a short last block included (interpreter, float32)."""
    _interpret(_INTERPRETED_NF4)


def test_sft_args_leave_the_gpu_queue_alone(tmp_path):
    from trl import SFTConfig

    args = fastpath.FastPathConfig().sft_args()
    assert args["logging_nan_inf_filter"] is False and args["gradient_checkpointing"] is False
    config = SFTConfig(output_dir=str(tmp_path), bf16=False, **args)  # taken as they are
    assert config.accelerator_config.non_blocking is True
    slow = fastpath.FastPathConfig(sync_free_steps=False).sft_args()
    assert "logging_nan_inf_filter" not in slow and "accelerator_config" not in slow


def _cpu_trainer(model, out_dir, *, callbacks=(), optimizer=None, **extra):
    """TRL's SFTTrainer on the CPU: 3 steps of 2 x 2 packed rows of a few tiny examples.
    ``optimizer`` maps the arguments to ``optimizer_cls_and_kwargs``."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from trainer.dev.tinymodel import build_tokenizer

    rows = [{"input_ids": e.tolist()} for e in _examples([5, 17, 30, 9, 24, 12, 40, 7])]
    args = SFTConfig(
        output_dir=str(out_dir),
        max_length=64,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        bf16=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        **extra,
    )
    return SFTTrainer(
        model=model,
        processing_class=build_tokenizer(VOCAB),
        train_dataset=Dataset.from_list(rows),
        callbacks=list(callbacks),
        args=args,
        optimizer_cls_and_kwargs=optimizer(args) if optimizer else None,
    )


def test_host_token_count_matches_the_trainers_own(tiny_model_dir, tmp_path):
    """On the fast path the trained tokens are counted on the host (no read-back of a GPU
    sum after every micro-step): the same total as the Trainer's own count."""
    totals, counters = [], []
    for host in (True, False):
        model = _load(tiny_model_dir, fast=True)
        fast = fastpath.FastPathConfig()
        extra = fast.sft_args()
        if not host:  # the Trainer's own count (padding-free rows: every token is real)
            extra["include_num_input_tokens_seen"] = "all"
        callbacks = fast.callbacks(model) if host else []
        trainer = _cpu_trainer(model, tmp_path / str(host), callbacks=callbacks, **extra)
        trainer.train()
        totals.append(trainer.state.num_input_tokens_seen)
        counters.append(callbacks)
    assert extra.get("include_num_input_tokens_seen") == "all"
    assert fastpath.FastPathConfig().sft_args()["include_num_input_tokens_seen"] == "no"
    assert [type(c) for c in counters[0]] == [fastpath.HostTokenCount]
    assert totals[0] == totals[1] > 0


def test_trainer_steps_the_packed_optimizer_as_its_own(tiny_model_dir, tmp_path):
    """A job's optimizer steps the LoRA weights packed into one buffer: the Trainer trains
    the same adapter as with its own paged 8-bit AdamW, and saves it as usual."""
    fast = fastpath.FastPathConfig()
    adapters, trainers = [], []
    for flat in (True, False):
        model = _load(tiny_model_dir, fast=True, rank=32)  # rank 32: most weights >= 4096
        trainer = _cpu_trainer(
            model,
            tmp_path / str(flat),
            optimizer=fast.optimizer if flat else None,
            learning_rate=1e-2,
            optim="paged_adamw_8bit",
            **fast.sft_args(),
        )
        trainer.train()
        trainers.append(trainer)
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        adapters.append(lora)
        if flat:
            model.save_pretrained(str(tmp_path / "adapter"))
    packed = trainers[0].optimizer.param_groups[0]["params"]
    own = trainers[1].optimizer.param_groups[0]["params"]
    assert len(own) == len(adapters[1]) == 28 and len(packed) == 5  # 1 flat + 4 k/v B (2048)
    assert adapters[0].keys() == adapters[1].keys()
    start = dict(_load(tiny_model_dir, fast=True, rank=32).named_parameters())
    for name, weight in adapters[0].items():
        assert not torch.equal(weight, start[name]), name  # it trained
        assert torch.equal(weight, adapters[1][name]), name
    fresh = _load(tiny_model_dir, fast=True, rank=32)
    fresh.load_adapter(str(tmp_path / "adapter"), adapter_name="saved")
    saved = {n: p for n, p in fresh.named_parameters() if ".saved." in n}
    assert len(saved) == len(adapters[0])
    for name, weight in saved.items():
        assert torch.equal(weight, adapters[0][name.replace(".saved.", ".default.")]), name


@pytest.mark.parametrize("nested", [True, False])
def test_nf4_weight_read_once_dequantises_as_bitsandbytes(nested):
    """The fast path keeps a 4-bit weight's packed data and state between calls; a weight
    replaced on the module (a reload, a move) is read again, never served stale."""
    import bitsandbytes as bnb
    from bitsandbytes.nn import Linear4bit

    def quantised(seed: int) -> Linear4bit:
        torch.manual_seed(seed)
        layer = Linear4bit(64, 128, bias=False, compress_statistics=nested, quant_type="nf4")
        layer.load_state_dict({"weight": torch.randn(128, 64)})
        return layer.to("cpu")  # quantises

    layer, other = quantised(0), quantised(1)
    for _ in range(2):  # the second call reads the kept state
        want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(nf4.base_weight(layer, torch.bfloat16), want.bfloat16())
    layer.weight = other.weight
    want = bnb.functional.dequantize_4bit(other.weight.data, other.weight.quant_state)
    assert torch.equal(nf4.base_weight(layer, torch.bfloat16), want.bfloat16())
    # The data swapped in place under the same Parameter, as ``Module.to`` does.
    layer.weight.data = quantised(2).weight.data
    want = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(nf4.base_weight(layer, torch.bfloat16), want.bfloat16())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("nested", [True, False])
def test_gpu_nf4_kernel_dequantises_as_bitsandbytes(nested, monkeypatch):
    """On CUDA, at the 8B shapes and a short last block, the one-kernel NF4 dequantisation
    is bitsandbytes' bit for bit in each compute dtype, and the fast path's layer reads
    its weights through it."""
    import bitsandbytes.functional as F
    from bitsandbytes.nn import Linear4bit

    for shape in ((4096, 4096), (1024, 4096), (14336, 4096), (100, 70)):
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            state.dtype = dtype  # bitsandbytes dequantises to the state's dtype
            want = F.dequantize_4bit(packed, state)
            assert torch.equal(kernels.dequantize_nf4(packed, state, dtype), want), shape
    layer = Linear4bit(64, 128, bias=False, compress_statistics=nested, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(128, 64)})
    layer = layer.to("cuda")
    calls = []
    real = kernels.dequantize_nf4
    monkeypatch.setattr(kernels, "dequantize_nf4", lambda *a: calls.append(a) or real(*a))
    want = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).bfloat16()
    assert torch.equal(nf4.base_weight(layer, torch.bfloat16), want) and len(calls) == 1


def test_residual_is_parked_only_where_o_proj_has_lora(tiny_model_dir, monkeypatch):
    """Without LoRA on o_proj the recompute runs it whole, so its norm parks nothing
    (the bus carries only what saves work); the step still trains."""
    targets = [t for t in ALL_PROJECTIONS if t != "o_proj"]
    model = _load(tiny_model_dir, fast=True, targets=targets).train()
    norms = [m for n, m in model.named_modules() if n.endswith("post_attention_layernorm")]
    attns = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    assert len(norms) == 2 and not any(m._fastpath_replay for m in norms)
    assert not any(hasattr(a.o_proj, "_fastpath_replayed") for a in attns)
    parked, real = [], parking.Parked.add_replay
    monkeypatch.setattr(
        parking.Parked,
        "add_replay",
        lambda p, t, meta: parked.append(meta[0]) or real(p, t, meta),
    )
    ids, pos, labels = _pack(_examples([9, 14, 5], seed=6))
    model(input_ids=ids, position_ids=pos, labels=labels).loss.backward()
    assert parked == ["sdpa", "sdpa"]  # each layer's attention, no residual
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_lean_recompute_and_flash_replay(tiny_model_dir, monkeypatch):
    """On CUDA (offloaded checkpoints, FlashAttention replayed from parked tensors): the
    same loss and gradients as the full recompute, within FlashAttention's atomics."""
    model = _load(tiny_model_dir, fast=True, device="cuda").train()
    runs = _lean_and_replay_runs(model, monkeypatch, device="cuda")
    (loss_all, g_all, n_all), (loss_res, g_res, n_res), (loss_lean, g_lean, n_lean) = runs[:3]
    loss_full, g_full, n_full = runs[3]
    assert (n_full - n_lean, n_lean - n_res, n_res - n_all) == (2, 2, 6)
    for loss, g in ((loss_all, g_all), (loss_res, g_res), (loss_lean, g_lean)):
        torch.testing.assert_close(loss, loss_full, rtol=1e-3, atol=0)
        assert ((g - g_full).norm() / g_full.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dropout_kernels_draw_one_independent_mask():
    """Compiled for CUDA at the 8B width: the drop share is p, 8 neighbours drawn by one
    Philox call are independent, and the backward's epilogue draws the forward's mask."""
    p, seed = 0.05, 4321
    ones = torch.ones(4096, 4096, device="cuda", dtype=torch.bfloat16)
    keep = kernels.dropout(ones, p, seed) != 0
    assert abs(keep.float().mean().item() - (1 - p)) < 1e-3
    for lag in (1, 3, 4, 7, 8):
        agree = (keep[:, lag:] == keep[:, :-lag]).float().mean().item()
        assert abs(agree - (p**2 + (1 - p) ** 2)) < 1e-3, (lag, agree)
    g_low = torch.ones(4096, 16, device="cuda", dtype=torch.bfloat16)
    a = torch.full((16, 4096), 1 / 16, device="cuda", dtype=torch.bfloat16)
    term = kernels.add_masked_lora_grad(torch.zeros_like(ones), g_low, a, p, seed)
    assert torch.equal(term != 0, keep)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("width", [4096, 14336])
def test_gpu_dropout_inside_lora_a_gemms_matches_the_written_copy(width):
    """Compiled for CUDA at the 8B widths and 8192 tokens: the LoRA term and A's gradient
    with the mask drawn inside the GEMM equal cuBLAS over the written dropped copy within
    bf16 rounding (float32 references)."""
    p, seed = 0.05, 99
    x = torch.randn(8192, width, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(64, width, device="cuda", dtype=torch.bfloat16) / width**0.5
    g = torch.randn(8192, 64, device="cuda", dtype=torch.bfloat16)
    dropped = kernels.dropout(x, p, seed).float()
    for got, want in (
        (kernels.dropout_mm(x, a, p, seed).float(), dropped @ a.float().t()),
        (kernels.dropout_mm_t(g, x, p, seed), g.float().t() @ dropped),
    ):
        assert ((got - want).norm() / want.norm()).item() < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_layer_mapped_embedding_and_cu_seqlens(tiny_model_dir):
    """On CUDA: the one-node LoRA layer (bitsandbytes' CUDA dequantisation, dropout) matches
    PEFT; the mapped host embedding gathers exactly the host rows; cu_seqlens from CUDA
    positions equals the host computation."""
    model = _load(tiny_model_dir, fast=True, device="cuda").train()
    layer = model.base_model.model.model.layers[0].mlp.gate_proj
    for dropout in (0.0, 0.2):
        x = torch.randn(3, 70, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        _layer_matches_peft(layer, x, dropout)
    emb = torch.nn.Embedding(1000, 64, padding_idx=0).to("cuda", torch.bfloat16)
    host = fastpath.HostEmbedding(emb)
    assert host.mapped is not None and host.table.is_pinned()
    ids = torch.randint(0, 1000, (4, 33), device="cuda")
    torch.testing.assert_close(host(ids), emb(ids), rtol=0, atol=0)
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]], device="cuda")
    cu, longest = fastpath.cu_seqlens_from_position_ids(pos)
    assert cu.is_cuda and cu.tolist() == [0, 3, 5, 9] and longest == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_varlen_matches_per_example_sdpa():
    torch.manual_seed(0)
    lengths = [300, 17, 1024, 2]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).cuda()
    total = sum(lengths)
    q = torch.randn(total, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = attention.FlashVarlen.apply(q, k, v, cu, max(lengths), 128**-0.5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qt, kt, vt = (t.detach().double().transpose(0, 1).requires_grad_() for t in (q, k, v))
    ref = attention.per_example_sdpa(qt, kt, vt, cu.cpu(), 128**-0.5).transpose(0, 1)
    ref_grads = torch.autograd.grad(ref, (qt, kt, vt), g.double())
    for got, want in [(out, ref), *zip(grads, (r.transpose(0, 1) for r in ref_grads), strict=True)]:
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


def test_host_embedding_gathers_the_same_rows():
    emb = torch.nn.Embedding(VOCAB, 16, padding_idx=0).to(torch.bfloat16)
    host = fastpath.HostEmbedding(emb)
    ids = torch.randint(0, VOCAB, (3, 7))
    torch.testing.assert_close(host(ids), emb(ids), rtol=0, atol=0)
    assert not any(True for _ in host.parameters())  # not a parameter: model.device unchanged


def test_compiled_elementwise_forwards_match_eager(tiny_model_dir, monkeypatch):
    """The patched RMSNorm/MLP/RoPE forwards compute what transformers' do (compile is CUDA-only
    in the fast path; here the same functions run eagerly)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    monkeypatch.setattr(elementwise, "COMPILED", {})
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    ids = _examples([24], seed=5)[0][None]
    with torch.no_grad():
        want = model(input_ids=ids).logits
        fastpath.compile_elementwise(model)
        got = model(input_ids=ids).logits
    modeling = sys.modules[type(model).__module__]
    monkeypatch.setattr(modeling, "apply_rotary_pos_emb", modeling._fastpath_eager_rope)
    del modeling._fastpath_eager_rope, modeling._fastpath_compiled_rope
    patched = [m for m in model.modules() if hasattr(m, "_fastpath_eager_forward")]
    assert len(patched) == 2 * 3 + 1  # two norms and an MLP a layer, and the final norm
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
