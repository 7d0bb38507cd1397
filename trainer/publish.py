"""Atomic publishing of adapters to the shared volume, and their removal.

A version folder is built in ``adapters/.staging`` (same filesystem), every
file fsynced, then renamed into ``adapters/<tenant>/<adapter>/<version>`` and
only then does ``current`` point at it: vLLM (through our resolver) never sees
half an adapter, and a folder once published is never modified.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import struct
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from trainer.config import ALL_PROJECTIONS, VLLM_LORA_RANKS
from trainer.errors import NotFound
from trainer.layout import CURRENT, Layout, fsync_dir, write_atomic
from trainer.names import served_name
from trainer.store import AdapterRecord, Store

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterRejected(Exception):
    """The trained adapter is not something vLLM would serve."""


class AdapterLoader(Protocol):
    """The serving side, as the publisher sees it (``trainer.vllm_admin``)."""

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


def _copy_fsynced(src: Path, dst: Path) -> None:
    dst.mkdir()
    for item in sorted(src.iterdir()):
        if item.is_file() and not item.name.startswith("."):
            shutil.copyfile(item, dst / item.name)
            with open(dst / item.name, "rb") as f:
                os.fsync(f.fileno())


class Publisher:
    """Publishes, lists and deletes adapters under ``DATA/adapters``."""

    def __init__(
        self,
        layout: Layout,
        store: Store,
        max_lora_rank: int,
        loader: AdapterLoader | None = None,
    ) -> None:
        self.layout = layout
        self.store = store
        self.max_lora_rank = max_lora_rank
        self.loader = loader
        self._lock = asyncio.Lock()

    def _existing_version(self, tenant: str, adapter: str, job_id: str) -> str | None:
        """The version a job already published (a restart mid-publish), if any."""
        for version in self.layout.versions(tenant, adapter):
            manifest = self.layout.version_dir(tenant, adapter, version) / "manifest.json"
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                if json.loads(manifest.read_text()).get("job_id") == job_id:
                    return version
        return None

    async def publish(self, tenant: str, adapter: str, src: Path, manifest: dict[str, Any]) -> str:
        """Publish ``src`` as the next version of ``<tenant>/<adapter>``; return the version."""
        check_adapter(src, self.max_lora_rank)
        async with self._lock:
            version = self._existing_version(tenant, adapter, manifest["job_id"])
            if version is None:
                version = await asyncio.to_thread(
                    self._publish_files, tenant, adapter, src, manifest
                )
            write_atomic(self.layout.adapter_dir(tenant, adapter) / CURRENT, version.encode())
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

    def _publish_files(self, tenant: str, adapter: str, src: Path, manifest: dict) -> str:
        stage = self.layout.staging / uuid.uuid4().hex
        try:
            _copy_fsynced(src, stage)
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            with open(stage / "manifest.json", "rb") as f:
                os.fsync(f.fileno())
            fsync_dir(stage)
            parent = self.layout.adapter_dir(tenant, adapter)
            parent.mkdir(parents=True, exist_ok=True)
            versions = self.layout.versions(tenant, adapter)
            n = int(versions[-1][1:]) + 1 if versions else 1
            version = f"v{n:04d}"
            os.rename(stage, parent / version)  # fails rather than replace an existing version
            fsync_dir(parent)
            return version
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    async def _hot_load(self, tenant: str, adapter: str, version: str) -> None:
        """Ask vLLM to load the new version now; if it is down, the resolver covers it later."""
        if self.loader is None:
            return
        path = self.layout.version_dir(tenant, adapter, version)
        try:
            await self.loader.reload(served_name(tenant, adapter), path)
        except Exception as e:  # serving trouble never fails a trained job
            log.warning("hot-load of %s/%s failed: %s", tenant, adapter, e)

    async def delete(self, tenant: str, adapter: str) -> None:
        """Unpublish an adapter name, then remove its folders once vLLM no longer holds them."""
        folder = self.layout.adapter_dir(tenant, adapter)
        known = self.store.delete_adapter(tenant, adapter)
        if not known and not folder.is_dir():
            raise NotFound(f"adapter {adapter!r} not found")
        async with self._lock:
            # Without `current` the resolver answers "not found" from now on.
            with contextlib.suppress(FileNotFoundError):
                (folder / CURRENT).unlink()
            unloaded = True
            if self.loader is not None:
                try:
                    await self.loader.unload(served_name(tenant, adapter))
                except Exception as e:
                    unloaded = False
                    log.warning("unload of %s/%s failed: %s", tenant, adapter, e)
            if not unloaded:
                # vLLM may still hold the path and re-read it after an eviction: keep the
                # folders (unreachable by name now) for a later sweep.
                return
            trash = self.layout.staging / f"deleted-{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(folder, trash)
                await asyncio.to_thread(shutil.rmtree, trash, True)

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
