"""The fast path's attention: equal examples take one dense causal call, others stay ragged.

Torch alone (no bitsandbytes, no PEFT), so the GPU test runs on a bare CUDA image too.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from trainer.fastpath import attention  # noqa: E402


def _qkv(tokens: int, heads: int, kv: int, dim: int, dtype, device="cpu", seed=0):
    """(1, heads, tokens, dim) views as transformers hands them over (from (1, tokens, heads,
    dim)), with gradients."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(
        torch.randn(1, tokens, h, dim, generator=gen, device=device, dtype=dtype)
        .transpose(1, 2)
        .detach()
        .requires_grad_(True)
        for h in (heads, kv, kv)
    )


def _per_example(q, k, v, cu, scale):
    """The reference: one causal SDPA call per example, (1, tokens, heads, dim) out."""
    packed = (t[0] for t in (q, k, v))  # (heads, tokens, dim)
    return attention.per_example_sdpa(*packed, cu, scale).transpose(0, 1)[None]


def test_equal_examples_counts_only_equal_lengths() -> None:
    assert attention.equal_examples(torch.tensor([0, 16, 32, 48]), 16, 48) == 3
    assert attention.equal_examples(torch.tensor([0, 64]), 64, 64) == 1
    # One longest example and shorter ones: not equal, whatever their number.
    assert attention.equal_examples(torch.tensor([0, 10, 32, 48, 64]), 22, 64) == 0
    assert attention.equal_examples(torch.tensor([0, 8, 16, 20]), 8, 20) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_call_computes_the_per_example_attention(dtype) -> None:
    """Grouped heads (4 query heads a KV head), four examples of 24 tokens: the same output
    and gradients as one causal call per example."""
    q, k, v = _qkv(96, 8, 2, 16, dtype)
    cu = torch.arange(0, 97, 24)
    out = attention.dense_causal(q, k, v, 4, 0.25)
    ref = _per_example(q, k, v, cu, 0.25)
    assert out.shape == ref.shape == (1, 96, 8, 16)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    tol = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize(
    ("lengths", "dense"), [([32, 32, 32], True), ([32, 20, 12, 32], False), ([96], True)]
)
def test_the_forward_goes_dense_only_for_equal_examples(lengths, dense, monkeypatch) -> None:
    calls = []
    real = attention.dense_causal
    monkeypatch.setattr(attention, "dense_causal", lambda *a: calls.append(a[3]) or real(*a))
    q, k, v = _qkv(96, 4, 2, 8, torch.float32, seed=1)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    out, _ = attention.varlen_attention_forward(
        torch.nn.Module(), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=max(lengths)
    )
    assert calls == ([len(lengths)] if dense else [])
    torch.testing.assert_close(out, _per_example(q, k, v, cu, 0.3), rtol=0, atol=1e-6)


def test_the_switch_sends_equal_examples_through_varlen(monkeypatch) -> None:
    """``DENSE_EQUAL`` off (the bench's ``-nodense``): equal examples take the varlen path,
    with the same answer."""
    monkeypatch.setattr(attention, "DENSE_EQUAL", False)
    monkeypatch.setattr(attention, "dense_causal", lambda *a: pytest.fail("went dense"))
    q, k, v = _qkv(96, 4, 2, 8, torch.float32, seed=2)
    cu = torch.tensor([0, 32, 64, 96])
    out, _ = attention.varlen_attention_forward(
        torch.nn.Module(), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=32
    )
    torch.testing.assert_close(out, _per_example(q, k, v, cu, 0.3), rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(32, 8), (28, 4)])  # Llama 3.1 8B's heads, Qwen 2.5 7B's
def test_gpu_dense_call_matches_flash_varlen(shape) -> None:
    """On CUDA, full rows at the reference shape (4 x 2048, head dim 128) through the dense
    backends: the varlen FlashAttention's output and gradients, both within bf16 of a
    float64 reference."""
    heads, kv = shape
    q, k, v = _qkv(4 * 2048, heads, kv, 128, torch.bfloat16, device="cuda")
    cu = torch.arange(0, 4 * 2048 + 1, 2048, dtype=torch.int32, device="cuda")
    scale = 128**-0.5
    dense = attention.dense_causal(q, k, v, 4, scale)
    packed = [t[0].transpose(0, 1) for t in (q, k, v)]  # (tokens, heads, dim)
    flash = attention.FlashVarlen.apply(*packed, cu, 2048, scale)[None]
    g = torch.randn_like(dense)
    grads = {
        "dense": (dense, torch.autograd.grad(dense, (q, k, v), g)),
        "flash": (flash, torch.autograd.grad(flash, (q, k, v), g)),
    }
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = _per_example(*ref_in, cu.cpu(), scale)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    for name, (out, got) in grads.items():
        for a, b in [(out, ref), *zip(got, ref_grads, strict=True)]:
            err = ((a.double() - b).norm() / b.norm()).item()
            assert err < 1e-2, (name, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(32, 8), (28, 4)])
def test_gpu_parked_dense_forward_replays_through_cudnn(shape, monkeypatch) -> None:
    """An offloaded checkpoint's forward of full rows parks cuDNN's output and log-sum-exp;
    the recompute's ``AttentionReplay`` runs cuDNN's backward on them: the output and the
    gradients within bf16 of a float64 reference, as the unparked paths."""
    from trainer.fastpath import parking

    heads, kv = shape
    monkeypatch.setattr(attention, "DENSE_PARKED", True)
    q, k, v = _qkv(4 * 2048, heads, kv, 128, torch.bfloat16, device="cuda", seed=3)
    cu = torch.arange(0, 4 * 2048 + 1, 2048, dtype=torch.int32, device="cuda")
    scale, layer = 128**-0.5, torch.nn.Module()
    layer._fastpath_replay = True
    kw = {"scaling": scale, "cu_seq_lens_q": cu, "max_length_q": 2048}
    parked = parking.Parked(torch.zeros(8, device="cuda"), None)
    monkeypatch.setitem(parking.LAST, "current", parked)
    with torch.no_grad():  # the checkpoint's forward
        out, _ = attention.varlen_attention_forward(layer, q, k, v, None, **kw)
    monkeypatch.setitem(parking.LAST, "current", None)
    assert [meta[0] for _, _, meta in parked.replays] == ["cudnn"]
    _, replays = parked.take()
    monkeypatch.setitem(parking.RECOMPUTE, "on", True)
    monkeypatch.setitem(parking.RECOMPUTE, "replay", replays)
    replayed, _ = attention.varlen_attention_forward(layer, q, k, v, None, **kw)
    assert not replays and torch.equal(replayed, out)
    g = torch.randn_like(replayed)
    got = torch.autograd.grad(replayed, (q, k, v), g)
    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = _per_example(*ref_in, cu.cpu(), scale)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    for a, b in [(out, ref), *zip(got, ref_grads, strict=True)]:
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-2, err
