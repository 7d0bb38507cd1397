"""Parked tensors: what an offloaded checkpoint keeps of a layer, in host memory.

A checkpointed layer's input is parked in pinned host memory between its forward and its
recompute, copied on a side stream and prefetched one layer ahead, so the layer inputs
(``layers x tokens x hidden`` bf16, 2 GiB for an 8B model at 4 x 2048) leave the GPU. The
replays park more beside it (``Parked.add_replay``): the attention's inputs, output and
log-sum-exp, and the residual stream after the attention.

``LAST`` and ``RECOMPUTE`` are the state the checkpoint shares with the layers it runs: the
``Parked`` being filled by a forward, and, while a layer is recomputed, its parked replays.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import Any

import torch


class Parked:
    """One layer's saved tensors in host memory (its input first), and their copies back.

    Besides the input, a layer's attention can park its inputs, output and log-sum-exp,
    and its MLP norm its input (``add_replay``): the recompute then replays the attention
    and the residual sum instead of computing them.
    """

    def __init__(self, x: torch.Tensor, prev: Parked | None) -> None:
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
LAST: dict[str, Any] = {"parked": None, "current": None}
# "on" while a layer is recomputed; "replay" holds its parked attention calls, in order.
RECOMPUTE: dict[str, Any] = {"on": False, "replay": None}


def replay_kind(entry: tuple) -> str:
    """``"attention"`` or ``"residual"``: what a parked entry (tensors, meta) replays."""
    return "residual" if entry[1][0] == "residual" else "attention"


def replay_head() -> str | None:
    """What a recompute replays next from its layer's parked tensors, in the forward's
    order: ``"attention"``, ``"residual"``, or None (nothing, or not a recompute)."""
    replay = RECOMPUTE["replay"]
    return replay_kind(replay[0]) if replay else None


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]
