"""Host embeddings: the frozen input-embedding table in pinned host memory.

The table is only gathered from: it stays in pinned host memory, mapped into the GPU's
address space, and the GPU gathers the rows it needs over the bus (1 GiB less at 8B, and no
host round trip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def host_embeddings(model) -> None:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    if isinstance(emb, torch.nn.Embedding) and emb.weight.is_cuda and not tied:
        model.set_input_embeddings(HostEmbedding(emb))
        del emb
        torch.cuda.empty_cache()
