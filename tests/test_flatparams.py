"""The packed optimizer (trainer/fastpath/flatparams.py) against bitsandbytes' own, weight by
weight."""

from __future__ import annotations

import io
import warnings

import pytest

bnb = pytest.importorskip("bitsandbytes")
import torch  # noqa: E402

from trainer.fastpath.flatparams import BLOCK, FlatParams, flat_optimizer  # noqa: E402

# 6144 and 4096 values: whole blocks; 6000: a part block; 512 and 35: 32-bit state, unpacked
SHAPES = [(64, 96), (8, 64), (300, 20), (64, 64), (5, 7)]
KWARGS = {"lr": 1e-2, "optim_bits": 8, "is_paged": True}
NO_GPU = not torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(NO_GPU, reason="no GPU")]),
]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Paged optimizers are not supported on CPU")
        yield


def _weights(device: str, seed: int = 1) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in SHAPES]


def _step(optimizers, weight_lists, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    for optimizer, weights in zip(optimizers, weight_lists, strict=True):
        for w, g in zip(weights, grads, strict=True):
            w.grad = g.to(w.device)
        optimizer.step()


def _groups(weights):
    return [
        {"params": weights[:3], "weight_decay": 0.01},
        {"params": weights[3:], "weight_decay": 0.0},
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_packed_weights_step_exactly_as_one_by_one(device):
    own, packed = _weights(device), _weights(device)
    reference = bnb.optim.AdamW(_groups(own), **KWARGS)
    optimizer = flat_optimizer(bnb.optim.AdamW)(_groups(packed), **KWARGS)
    # group 0: one flat buffer for 6144 + 6000 (padded to 6144) values, and the 512 alone
    flat, alone = optimizer.param_groups[0]["params"]
    assert flat.numel() == 6144 + 6144 and alone is packed[1]
    assert optimizer.param_groups[1]["params"][1] is packed[4]
    for step in range(4):
        _step([reference, optimizer], [own, packed], seed=10 + step)
        for a, b in zip(own, packed, strict=True):
            assert torch.equal(a, b), step
    assert all(w.grad is None for w in (packed[0], packed[2])), "the flat gradient replaced them"
    assert flat.grad is None  # released after the step: no second copy of the gradients kept


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoints_of_either_optimizer_resume_the_packed_one(device):
    """A checkpoint written before packing (per-weight state) resumes exactly, as does the
    packed optimizer's own."""
    own, packed = _weights(device), _weights(device)
    reference = bnb.optim.AdamW(_groups(own), **KWARGS)
    optimizer = flat_optimizer(bnb.optim.AdamW)(_groups(packed), **KWARGS)
    for step in range(2):
        _step([reference, optimizer], [own, packed], seed=20 + step)

    def saved(opt):
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    resumed = []
    for state in (saved(reference), saved(optimizer)):
        weights = [torch.nn.Parameter(w.detach().clone()) for w in own]
        opt = flat_optimizer(bnb.optim.AdamW)(_groups(weights), **KWARGS)
        opt.load_state_dict(state)
        resumed.append((opt, weights))
    for step in range(3):
        _step([reference] + [o for o, _ in resumed], [own] + [w for _, w in resumed], 30 + step)
        for _, weights in resumed:
            for a, b in zip(own, weights, strict=True):
                assert torch.equal(a, b), step


def test_unpacked_checkpoint_of_another_model_is_refused():
    own = _weights("cpu")
    reference = bnb.optim.AdamW([{"params": own[:2]}, {"params": own[2:]}], **KWARGS)
    _step([reference], [own], seed=3)
    state = reference.state_dict()
    optimizer = flat_optimizer(bnb.optim.AdamW)(_groups(_weights("cpu")), **KWARGS)
    with pytest.raises(ValueError, match="group holds 2 weights, the model trains 3"):
        optimizer.load_state_dict(state)


def test_a_replaced_weight_is_packed_again_and_trained():
    """Loading a checkpoint with ``assign=True`` replaces a weight's data: the next step
    packs it again, so the model keeps seeing the optimizer's updates."""
    own, packed = _weights("cpu"), _weights("cpu")
    reference = bnb.optim.AdamW(_groups(own), **KWARGS)
    optimizer = flat_optimizer(bnb.optim.AdamW)(_groups(packed), **KWARGS)
    _step([reference, optimizer], [own, packed], seed=5)
    with torch.no_grad():
        own[0].mul_(0.5)
        packed[0].data = packed[0].data.clone() * 0.5  # no longer a view of the flat buffer
    _step([reference, optimizer], [own, packed], seed=6)
    assert torch.equal(own[0], packed[0])
    flat = optimizer.param_groups[0]["params"][0]
    assert packed[0].data_ptr() == flat.data_ptr()


def test_offsets_are_whole_blocks():
    pack = FlatParams([torch.nn.Parameter(torch.ones(n)) for n in (4096, 5000, 300)])
    assert pack.offsets == [0, 4096, 4096 + 5120]
    assert pack.flat.numel() == 4096 + 5120 + 512
    assert all(o % BLOCK == 0 for o in pack.offsets)
    assert pack.flat[4096 + 5000 : 4096 + 5120].abs().sum() == 0  # padding stays zero
