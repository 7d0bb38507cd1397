"""Finding a tenant's published adapter, for the resolver and the middleware.

A served name, ``<tenant>/<adapter>`` or ``<tenant>/<adapter>@<version>``, is parsed and
every part validated by ``trainer.names`` before the adapter store
(``trainer.adapter_store``) is asked for anything, so ``..``, absolute paths, extra
slashes and non-ASCII names never reach it. The plain name serves the store's current
version; the versioned one serves exactly that version, whatever ``current`` says, while
the adapter is published and the version held. Either is fetched into a local folder and
served only if its ``adapter_config.json`` says LoRA on the base model served here.

The store is the trainer's: the shared volume, or object storage named by
``FINETUNE_ADAPTER_STORE`` (``s3://bucket/prefix``, see ``open_store``), whose versions are
fetched into a cache under the data directory first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from trainer.adapter_store import AdapterStore
from trainer.errors import InvalidArgument
from trainer.layout import ADAPTER_CACHE, Layout
from trainer.names import ServedName, parse_served_name, split_served_name
from trainer.object_store import adapter_store_from_url

# Under "vllm.": these run inside vLLM, whose logging setup then shows our lines too.
log = logging.getLogger("vllm.finetune.adapters")

# vLLM wants a positive LoRA id; int32 keeps it safe wherever it is stored.
_ID_MODULUS = 2**31 - 1

ENV_ADAPTER_STORE = "FINETUNE_ADAPTER_STORE"
"""Where the trainer publishes: "" (the shared volume) or ``s3://bucket/prefix``."""
CACHE_DIR = ADAPTER_CACHE  # under DATA (``Layout.adapter_cache``)
"""Under the data directory: versions fetched from object storage, for vLLM to read."""


def open_store(data_dir: Path, url: str | None = None) -> AdapterStore:
    """The adapter store ``url`` (default: ``$FINETUNE_ADAPTER_STORE``) names, read from the
    data directory ``data_dir``: the volume itself, or object storage cached under it."""
    url = os.environ.get(ENV_ADAPTER_STORE, "") if url is None else url
    layout = Layout(Path(data_dir))
    return adapter_store_from_url(url, layout, layout.adapter_cache)


@dataclass(frozen=True)
class PublishedAdapter:
    """One servable adapter version."""

    tenant: str
    adapter: str
    version: str
    path: Path
    explicit: bool = False
    """Asked for by version (``<tenant>/<adapter>@<version>``), not as the current one."""

    @property
    def served_name(self) -> str:
        """The name it was asked for, which vLLM loads it under."""
        return str(ServedName(self.tenant, self.adapter, self.version if self.explicit else None))

    @property
    def lora_int_id(self) -> int:
        return stable_lora_id(self.tenant, self.adapter, self.version, explicit=self.explicit)


def stable_lora_id(tenant: str, adapter: str, version: str, *, explicit: bool = False) -> int:
    """A positive id in [1, 2**31 - 1], the same in every process and after restarts.

    Derived from SHA-256, never from Python's ``hash()``, which is salted per process.

    The id is one per (served name, version) pair: ``t/a`` serving v0002 hashes
    ``t/a/v0002`` (as before versioned names existed, so those ids did not change),
    ``t/a@v0002`` hashes ``t/a@v0002``. Neither ``/`` nor ``@`` can occur in a name or a
    version, so the two kinds of key never coincide. They must differ: vLLM keys loaded
    adapters by name in the API server (``OpenAIServingModels.lora_requests``) but by
    ``lora_int_id`` in the engine (``LRUCacheWorkerLoRAManager.add_adapter`` loads only
    an id it does not hold, or replaces it for ``load_inplace``). Two names sharing an id
    would share one slot: reloading ``t/a`` in place with v0003 (publish, rollback) would
    make ``t/a@v0002`` answer with v0003's weights. Including the version keeps ``t/a``'s
    id new whenever it moves to another version, as before. (vLLM 0.32's API server
    replaces the resolver's id with a counter of its own, one per name, which keeps names
    apart too; these ids hold for any caller that keeps them.)
    """
    sep = "@" if explicit else "/"
    digest = hashlib.sha256(f"{tenant}/{adapter}{sep}{version}".encode()).digest()
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
    """The adapter version ``model`` names, if it may be served here.

    ``<tenant>/<adapter>``: the current version. ``<tenant>/<adapter>@<version>``: that
    version if the store holds it, whatever ``current`` names, but only while the adapter
    is published (has a current version): an unpublished adapter is gone under every name.
    """
    name = parse_served_name(model)
    if name is None:
        return None
    tenant, adapter = name.tenant, name.adapter
    try:
        version = adapters.current(tenant, adapter)
        if version is not None and name.version is not None:
            version = name.version
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
    return PublishedAdapter(
        tenant=tenant,
        adapter=adapter,
        version=version,
        path=path,
        explicit=name.version is not None,
    )


def list_published(
    adapters: AdapterStore, tenant: str, accepted_bases: Iterable[str]
) -> list[PublishedAdapter]:
    """Every servable adapter of ``tenant``, by plain name (its current version)."""
    accepted = list(accepted_bases)
    found = []
    for name in adapters.names(tenant):
        if split_served_name(f"{tenant}/{name}") is None:
            continue
        adapter = find(adapters, f"{tenant}/{name}", accepted)
        if adapter is not None:
            found.append(adapter)
    return found
