"""Publishing trained adapters, and removing them: the job store's records, the adapter
store's versions (``trainer.adapter_store``: written whole, then named current) and vLLM's
copy (hot-loaded at once, unloaded before the files go), kept in step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
from pathlib import Path
from typing import Any, Protocol

from trainer.adapter_store import AdapterStore
from trainer.config import ALL_PROJECTIONS, VLLM_LORA_RANKS
from trainer.errors import NotFound
from trainer.names import served_name
from trainer.service.store import AdapterRecord, Store

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterRejected(Exception):
    """The trained adapter is not something vLLM would serve."""


class AdapterLoader(Protocol):
    """The serving side, as the publisher sees it (``trainer.service.vllm_admin``)."""

    async def reload(self, served: str, path: Path) -> bool: ...
    async def unload(self, served: str) -> bool: ...


def _safetensors_keys(path: Path) -> list[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 << 20:
            raise AdapterRejected(f"{path.name}: header of {n} bytes is implausible")
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


def check_adapter(folder: Path, max_lora_rank: int) -> dict[str, Any]:
    """Check an adapter against what vLLM's ``--enable-lora`` accepts; return its config."""
    for name in ADAPTER_FILES:
        if not (folder / name).is_file():
            raise AdapterRejected(f"{name} is missing")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type") != "LORA":
        raise AdapterRejected(f"peft_type {cfg.get('peft_type')!r} is not LORA")
    r = cfg.get("r")
    if r not in VLLM_LORA_RANKS or r > max_lora_rank:
        raise AdapterRejected(f"rank {r} is not in vLLM's ranks up to {max_lora_rank}")
    if cfg.get("modules_to_save"):
        raise AdapterRejected(f"modules_to_save {cfg['modules_to_save']} is not served by vLLM")
    if cfg.get("use_dora"):
        raise AdapterRejected("DoRA adapters are not served by vLLM")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not set(targets) <= set(ALL_PROJECTIONS):
        raise AdapterRejected(f"target_modules {targets!r} are not all of {ALL_PROJECTIONS}")
    for key in _safetensors_keys(folder / "adapter_model.safetensors"):
        if not ("lora_A" in key or "lora_B" in key):
            raise AdapterRejected(f"tensor {key!r} is not a LoRA weight")
        if not any(f".{t}." in key for t in targets):
            raise AdapterRejected(f"tensor {key!r} is outside the target modules")
    return cfg


class Publisher:
    """Publishes and deletes adapters: checked, stored as versions, recorded, served."""

    def __init__(
        self,
        adapters: AdapterStore,
        store: Store,
        max_lora_rank: int,
        loader: AdapterLoader | None = None,
    ) -> None:
        self.adapters = adapters
        self.store = store
        self.max_lora_rank = max_lora_rank
        self.loader = loader
        self._lock = asyncio.Lock()

    async def publish(self, tenant: str, adapter: str, src: Path, manifest: dict[str, Any]) -> str:
        """Publish ``src`` as the next version of ``<tenant>/<adapter>``; return the version."""
        check_adapter(src, self.max_lora_rank)
        async with self._lock:
            version = await asyncio.to_thread(self.adapters.publish, tenant, adapter, src, manifest)
        self.store.add_adapter(
            AdapterRecord(
                tenant=tenant,
                name=adapter,
                version=version,
                job_id=manifest["job_id"],
                base_model=manifest["base_model"],
                created_at=manifest["created_at"],
            )
        )
        await self._hot_load(tenant, adapter, version)
        return version

    async def _hot_load(self, tenant: str, adapter: str, version: str) -> None:
        """Ask vLLM to load the new version now; if it is down, the resolver covers it later."""
        path = self.adapters.fetch(tenant, adapter, version)
        if self.loader is None or path is None:
            return
        try:
            await self.loader.reload(served_name(tenant, adapter), path)
        except Exception as e:  # serving trouble never fails a trained job
            log.warning("hot-load of %s/%s failed: %s", tenant, adapter, e)

    async def delete(self, tenant: str, adapter: str) -> None:
        """Unpublish an adapter name, then remove its versions once vLLM no longer holds them."""
        known = self.store.delete_adapter(tenant, adapter)
        if not known and not self.adapters.versions(tenant, adapter):
            raise NotFound(f"adapter {adapter!r} not found")
        async with self._lock:
            # Not current any more: the resolver answers "not found" from now on.
            self.adapters.unpublish(tenant, adapter)
            unloaded = True
            if self.loader is not None:
                try:
                    await self.loader.unload(served_name(tenant, adapter))
                except Exception as e:
                    unloaded = False
                    log.warning("unload of %s/%s failed: %s", tenant, adapter, e)
            if not unloaded:
                # vLLM may still hold the path and re-read it after an eviction: keep the
                # versions (unreachable by name now) for a later sweep.
                return
            await asyncio.to_thread(self.adapters.remove, tenant, adapter)

    def manifest(
        self,
        *,
        job_id: str,
        tenant: str,
        adapter: str,
        base_model: str,
        dataset_sha256: str,
        hyperparameters: dict[str, Any],
        metrics: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "job_id": job_id,
            "tenant": tenant,
            "adapter": adapter,
            "served_name": served_name(tenant, adapter),
            "base_model": base_model,
            "dataset_sha256": dataset_sha256,
            "hyperparameters": hyperparameters,
            "metrics": metrics,
            "created_at": time.time(),
        }
