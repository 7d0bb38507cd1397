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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from trainer.adapter_store import AdapterStore
from trainer.config import ALL_PROJECTIONS, VLLM_LORA_RANKS
from trainer.errors import InvalidArgument, NotFound, Unavailable
from trainer.layout import VERSION_RE
from trainer.names import served_name
from trainer.service.store import AdapterRecord, Store

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_version(version: str) -> str:
    if not VERSION_RE.fullmatch(version):
        raise InvalidArgument("version", f"{version!r} is not a version like 'v0002'")
    return version


@dataclass(frozen=True)
class AdapterView:
    """An adapter as its tenant sees it: the version served and how it was chosen."""

    served: AdapterRecord  # the version served under the plain name
    newest: str
    pinned: bool
    version_count: int


@dataclass(frozen=True)
class VersionView:
    """One version of an adapter, with what its manifest says."""

    record: AdapterRecord
    manifest: dict[str, Any]
    dataset_id: str
    size_bytes: int
    served: bool


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


class AdapterStorageDown(Unavailable):
    """The adapter store did not answer for as long as a publish would wait; its message
    names no endpoint (the chained cause does), so a tenant may read it."""


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

    async def publish(
        self,
        tenant: str,
        adapter: str,
        src: Path,
        manifest: dict[str, Any],
        *,
        wait_s: float = 0.0,
        waiting: Callable[[str], Awaitable[Any]] | None = None,
    ) -> str:
        """Publish ``src`` as the next version of ``<tenant>/<adapter>``; return the version.

        While the adapter store does not answer (object storage down for a while; a write
        that raised ``Unavailable`` left no listed version), wait and write again, telling
        ``waiting`` each time, for up to ``wait_s``; then ``AdapterStorageDown``."""
        check_adapter(src, self.max_lora_rank)
        deadline = time.monotonic() + wait_s
        delay = 1.0
        while True:
            try:
                async with self._lock:
                    version = await asyncio.to_thread(
                        self.adapters.publish, tenant, adapter, src, manifest
                    )
                break
            except Unavailable as e:
                if time.monotonic() + delay > deadline:
                    raise AdapterStorageDown(
                        f"adapter storage did not answer for {wait_s:.0f} s"
                    ) from e  # the endpoint stays in the cause, for the log
                log.warning("publishing %s/%s: %s; again in %.0f s", tenant, adapter, e, delay)
                if waiting is not None:
                    await waiting(
                        f"adapter storage did not answer; publishing again in {delay:.0f} s"
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
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
        current = self.adapters.current(tenant, adapter)
        if current == version:  # not when an earlier version is pinned
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
        versions = self.adapters.versions(tenant, adapter)
        known = self.store.delete_adapter(tenant, adapter)
        if not known and not versions:
            raise NotFound(f"adapter {adapter!r} not found")
        async with self._lock:
            # Not current any more: the resolver answers "not found" from now on.
            self.adapters.unpublish(tenant, adapter)
            await self._remove_unpublished(tenant, adapter, versions)

    async def _remove_unpublished(self, tenant: str, adapter: str, versions: list[str]) -> bool:
        """Remove an unpublished adapter's versions once vLLM has let go of each name they
        were served under; keep them (for ``sweep``) if it cannot confirm that."""
        if self.loader is not None:
            name = served_name(tenant, adapter)
            try:
                for served in [name, *(f"{name}@{v}" for v in versions)]:
                    await self.loader.unload(served)
            except Exception as e:
                # vLLM may still hold the path and re-read it after an eviction: keep the
                # versions (unreachable by name now) for a later sweep.
                log.warning(
                    "unload of %s/%s failed, its files stay for now: %s", tenant, adapter, e
                )
                return False
        await asyncio.to_thread(self.adapters.remove, tenant, adapter)
        return True

    async def sweep(self) -> list[str]:
        """Remove the adapters left unpublished because vLLM could not confirm an unload
        (``delete``), now that it can; return their served names. Runs at start and after
        each publish or delete."""
        removed = []
        async with self._lock:
            for tenant, adapter in self.adapters.unpublished():
                if self.store.list_adapter_versions(tenant, adapter):
                    continue  # recorded: a publish that has not named its version yet
                versions = self.adapters.versions(tenant, adapter)
                if await self._remove_unpublished(tenant, adapter, versions):
                    removed.append(served_name(tenant, adapter))
        if removed:
            log.info("swept %d adapter(s) deleted earlier: %s", len(removed), removed)
        return removed

    async def set_served(self, tenant: str, adapter: str, version: str | None) -> str:
        """Serve ``version`` under the adapter's plain name from now on (None: the newest,
        now and later); vLLM swaps at once. Returns the version served."""
        if version is not None:
            check_version(version)
        async with self._lock:
            current = await asyncio.to_thread(self.adapters.pin, tenant, adapter, version)
        await self._hot_load(tenant, adapter, current)
        return current

    async def delete_version(self, tenant: str, adapter: str, version: str) -> None:
        """Remove one version that is not the one served; vLLM first forgets its
        ``@version`` name (if it cannot confirm that, nothing is removed)."""
        check_version(version)
        async with self._lock:
            if version not in self.adapters.versions(tenant, adapter):
                raise NotFound(f"version: adapter {adapter!r} has no version {version!r}")
            if self.loader is not None:
                served = f"{served_name(tenant, adapter)}@{version}"
                try:
                    await self.loader.unload(served)
                except Exception as e:
                    log.warning("unload of %s failed: %s", served, e)
                    raise Unavailable(
                        f"vLLM did not confirm it let go of {served}; nothing was removed, "
                        "try again"
                    ) from e
            await asyncio.to_thread(self.adapters.remove_version, tenant, adapter, version)
            self.store.delete_adapter_version(tenant, adapter, version)

    def views(self, tenant: str) -> list[AdapterView]:
        """The tenant's adapters, by name."""
        found = []
        for newest in self.store.list_adapters(tenant):
            records = self.store.list_adapter_versions(tenant, newest.name)
            current = self.adapters.current(tenant, newest.name)
            served = next((r for r in records if r.version == current), newest)
            pinned = self.adapters.pinned(tenant, newest.name) is not None
            found.append(AdapterView(served, newest.version, pinned, len(records)))
        return found

    def versions(self, tenant: str, adapter: str) -> list[VersionView]:
        """Every version of ``adapter``, newest first."""
        records = self.store.list_adapter_versions(tenant, adapter)
        if not records:
            raise NotFound(f"adapter {adapter!r} not found")
        current = self.adapters.current(tenant, adapter)
        views = []
        for r in records:
            job = self.store.get_job(tenant, r.job_id)
            views.append(
                VersionView(
                    record=r,
                    manifest=self.adapters.manifest(tenant, adapter, r.version) or {},
                    dataset_id=job.dataset_id if job else "",
                    size_bytes=self.adapters.size(tenant, adapter, r.version),
                    served=r.version == current,
                )
            )
        return views

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
