"""Trainable weights packed into one flat buffer, so that an 8-bit optimizer steps them at once.

bitsandbytes' 8-bit optimizers update one weight per kernel and synchronise the device
after each one (``Optimizer8bit.step`` calls ``sync_gpu``): at 8B with LoRA r=64 on seven
projections, 448 launches and 448 waits per optimizer step. Their state is quantised in
blocks of 256 values, each block with its own absmax, and a value's update reads only its
own block. Weights packed at offsets that are multiples of 256 therefore step exactly as
they do one by one: the same blocks and the same numbers, in one kernel and one wait.

``flat_optimizer(cls)`` is ``cls`` packing its weights, for
``Trainer(optimizer_cls_and_kwargs=...)``. The model's weights become views into the flat
buffer, so the model, its checkpoints and the saved adapter see every update; the
optimizer's checkpoint holds the flat state. A checkpoint written by the unpacked
optimizer still loads: its per-weight states are packed the same way.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

BLOCK = 256  # values per absmax in bitsandbytes' 8-bit optimizer state
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller weights get 32-bit state
_PER_WEIGHT = ("state1", "state2", "absmax1", "absmax2")  # bnb keys laid out along the weight
_WRAPPED = "__bnb_optimizer_quant_state__"  # Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


class FlatParams:
    """Weights of one dtype and device as views into one flat ``Parameter`` (``flat``).

    The optimizer steps ``flat``. ``gather`` fills its gradient from the weights' own
    gradients (dropping those: the flat one replaces them) and packs again any weight that
    was replaced or moved since, e.g. by loading a checkpoint with ``assign=True``.
    """

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.offsets: list[int] = []
        total = 0
        for p in params:
            self.offsets.append(total)
            total += _padded(p.numel())
        self.flat = torch.nn.Parameter(params[0].detach().new_zeros(total))
        self.views = [
            self.flat.data[o : o + p.numel()].view(p.shape)
            for o, p in zip(self.offsets, params, strict=True)
        ]
        for p, view in zip(params, self.views, strict=True):
            view.copy_(p.data)
            p.data = view

    def gather(self) -> None:
        pieces: list[torch.Tensor] = []
        found = False
        for p, view in zip(self.params, self.views, strict=True):
            if p.data_ptr() != view.data_ptr():
                view.copy_(p.data)
                p.data = view
            n = p.numel()
            if p.grad is None:
                pieces.append(view.new_zeros(n))
            else:
                pieces.append(p.grad.reshape(-1))
                found = True
            if _padded(n) != n:
                pieces.append(view.new_zeros(_padded(n) - n))
        # A weight without a gradient steps as if its gradient were zero; with none, no step.
        self.flat.grad = torch.cat(pieces) if found else None
        for p in self.params:
            p.grad = None

    def release(self) -> None:
        self.flat.grad = None

    def pack_state(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """The flat state of per-weight optimizer states (bnb's keys), as they would be."""
        wrapped = _WRAPPED in states[0]  # bnb's state_dict nests the quantised state
        inner = [state[_WRAPPED] if wrapped else state for state in states]
        packed = dict(inner[0])
        for key in _PER_WEIGHT:
            if key not in packed:
                continue
            parts = []
            for p, state in zip(self.params, inner, strict=True):
                value = state[key].reshape(-1)
                pad = value.new_zeros(_padded(p.numel()) - p.numel())
                if key.startswith("state") and value.dtype == torch.uint8:
                    # the padding shares the weight's last block: it must hold the code of
                    # 0.0, or its absmax would change
                    pad.fill_(int(state["qmap" + key[-1]].abs().argmin()))
                parts.append(value if key.startswith("absmax") else torch.cat([value, pad]))
            packed[key] = torch.cat(parts)
        return {**states[0], _WRAPPED: packed} if wrapped else packed


@functools.cache
def flat_optimizer(optimizer_cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``optimizer_cls`` stepping packed weights, for ``Trainer(optimizer_cls_and_kwargs=...)``.

    Only weights that get blockwise 8-bit state (at least ``min_8bit_size`` values) are
    packed: smaller ones get 32-bit state one by one, and packing would change that.
    """

    class Packed(optimizer_cls):  # type: ignore[valid-type,misc]
        def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
            groups = list(params)
            if groups and not isinstance(groups[0], dict):
                groups = [{"params": groups}]
            self._layout = _pack(groups, kwargs.get("min_8bit_size", MIN_8BIT_SIZE))
            self._packs = [pack for _, packs, _ in self._layout for pack in packs]
            super().__init__(
                [
                    {**group, "params": [pack.flat for pack in packs] + rest}
                    for group, (_, packs, rest) in zip(groups, self._layout, strict=True)
                ],
                **kwargs,
            )

        @torch.no_grad()
        def step(self, closure: Callable[[], Any] | None = None) -> Any:
            for pack in self._packs:
                pack.gather()
            try:
                return super().step(closure)
            finally:
                for pack in self._packs:
                    pack.release()

        def load_state_dict(self, state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            super().load_state_dict(_packed_state_dict(state_dict, self._layout), *args, **kwargs)

    Packed.__name__ = Packed.__qualname__ = f"Packed{optimizer_cls.__name__}"
    return Packed


def _pack(groups: list[dict[str, Any]], min_size: int) -> list[tuple]:
    """Per group: its weights, their packs (by dtype and device), and the weights left alone."""
    layout = []
    for group in groups:
        params = list(group["params"])
        by_kind: dict[tuple, list[torch.nn.Parameter]] = defaultdict(list)
        for p in params:
            if p.numel() >= min_size:
                by_kind[(p.dtype, p.device)].append(p)
        packs = [FlatParams(ps) for ps in by_kind.values()]
        packed = {id(p) for pack in packs for p in pack.params}
        layout.append((params, packs, [p for p in params if id(p) not in packed]))
    return layout


def _packed_state_dict(state_dict: dict[str, Any], layout: list[tuple]) -> dict[str, Any]:
    """A checkpoint of the unpacked optimizer, packed as ``_pack`` packs the weights."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(layout) or all(
        len(saved["params"]) == len(packs) + len(rest)
        for saved, (_, packs, rest) in zip(saved_groups, layout, strict=True)
    ):
        return state_dict  # already packed, or not ours to convert: the optimizer decides
    state, groups = {}, []
    next_id = 0
    for saved, (params, packs, rest) in zip(saved_groups, layout, strict=True):
        if len(saved["params"]) != len(params):
            raise ValueError(
                f"optimizer checkpoint: a parameter group holds {len(saved['params'])} "
                f"weights, the model trains {len(params)} in it"
            )
        by_param = {id(p): saved_id for p, saved_id in zip(params, saved["params"], strict=True)}
        ids = []
        for pack in packs:
            states = [state_dict["state"].get(by_param[id(p)]) for p in pack.params]
            if any(s is not None for s in states):
                if any(s is None for s in states):
                    raise ValueError("optimizer checkpoint: some packed weights have no state")
                state[next_id] = pack.pack_state(states)
            ids.append(next_id)
            next_id += 1
        for p in rest:
            if by_param[id(p)] in state_dict["state"]:
                state[next_id] = state_dict["state"][by_param[id(p)]]
            ids.append(next_id)
            next_id += 1
        groups.append({**saved, "params": ids})
    return {"state": state, "param_groups": groups}
