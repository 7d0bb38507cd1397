"""Finding a tenant's published adapter, for the resolver and the middleware.

A served name ``<tenant>/<adapter>`` is split and both parts validated by
``trainer.names`` before the adapter store (``trainer.adapter_store``) is asked for
anything, so ``..``, absolute paths, extra slashes and non-ASCII names never reach it. The
adapter served is the store's current version, fetched into a local folder; it is served
only if its ``adapter_config.json`` says LoRA on the base model served here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trainer.adapter_store import AdapterStore
from trainer.errors import InvalidArgument
from trainer.names import split_served_name

# Under "vllm.": these run inside vLLM, whose logging setup then shows our lines too.
log = logging.getLogger("vllm.finetune.adapters")

# vLLM wants a positive LoRA id; int32 keeps it safe wherever it is stored.
_ID_MODULUS = 2**31 - 1


@dataclass(frozen=True)
class PublishedAdapter:
    """One servable adapter version."""

    tenant: str
    adapter: str
    version: str
    path: Path

    @property
    def served_name(self) -> str:
        return f"{self.tenant}/{self.adapter}"

    @property
    def lora_int_id(self) -> int:
        return stable_lora_id(self.tenant, self.adapter, self.version)


def stable_lora_id(tenant: str, adapter: str, version: str) -> int:
    """A positive id in [1, 2**31 - 1], the same in every process and after restarts.

    Derived from SHA-256, never from Python's ``hash()``, which is salted per process.
    """
    digest = hashlib.sha256(f"{tenant}/{adapter}/{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _ID_MODULUS + 1


def _base_of(path: Path) -> str | None:
    """The adapter's base model if it is a LoRA adapter, else None."""
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        return None
    base = cfg.get("base_model_name_or_path")
    return base if isinstance(base, str) else None


def find(
    adapters: AdapterStore, model: str, accepted_bases: Iterable[str]
) -> PublishedAdapter | None:
    """The current version of ``model`` (``<tenant>/<adapter>``) if it may be served here."""
    parts = split_served_name(model) if isinstance(model, str) else None
    if parts is None:
        return None
    tenant, adapter = parts
    try:
        version = adapters.current(tenant, adapter)
        path = adapters.fetch(tenant, adapter, version) if version else None
    except (InvalidArgument, ValueError, OSError):
        return None
    if version is None or path is None:
        return None
    base = _base_of(path)
    accepted = {b for b in accepted_bases if b}
    if base is None or base not in accepted:
        log.warning(
            "adapter %s (%s) is for base %r, not one of %s; refused",
            model,
            version,
            base,
            sorted(accepted),
        )
        return None
    return PublishedAdapter(tenant=tenant, adapter=adapter, version=version, path=path)


def list_published(
    adapters: AdapterStore, tenant: str, accepted_bases: Iterable[str]
) -> list[PublishedAdapter]:
    """Every servable adapter of ``tenant``, by name."""
    accepted = list(accepted_bases)
    found = []
    for name in adapters.names(tenant):
        if split_served_name(f"{tenant}/{name}") is None:
            continue
        adapter = find(adapters, f"{tenant}/{name}", accepted)
        if adapter is not None:
            found.append(adapter)
    return found
