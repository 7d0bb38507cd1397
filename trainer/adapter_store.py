"""Where published adapters live: immutable version folders and a pointer to the current one.

``AdapterStore`` is the seam: the trainer publishes through it (``trainer.service.publish``) and the
vLLM plugin finds and fetches through it (``server.adapters``). ``LocalAdapterStore``, the
one implementation today, keeps them on the shared volume::

    DATA/adapters/<tenant>/<adapter>/<version>/   adapter, tokenizer, manifest.json
    DATA/adapters/<tenant>/<adapter>/current      names the current version
    DATA/adapters/<tenant>/<adapter>/pinned       names the version pinned as current, if any

Its rules, whatever holds the bytes (object storage, for several hosts, keeps them too):
a version is written whole before anything can name it, and never modified afterwards
(vLLM re-reads a folder after evicting it from its CPU cache); the current pointer moves
last, to the new version unless an earlier one is pinned (a rollback). This module is
imported by the vLLM plugin too, so it stays free of heavy imports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Protocol

from trainer.errors import FailedPrecondition, InvalidArgument, NotFound
from trainer.layout import CURRENT, PINNED, Layout, fsync_dir, write_atomic
from trainer.names import check_name

log = logging.getLogger("vllm.finetune.adapter_store")  # also logged inside vLLM

MANIFEST = "manifest.json"


class AdapterStore(Protocol):
    def publish(self, tenant: str, adapter: str, src: Path, manifest: dict[str, Any]) -> str:
        """``src`` (an adapter's folder) with ``manifest`` as the next version, then the
        current one unless a version is pinned; the version. A job that published already
        (a restart mid-publish) gets its own version back, not a second one."""
        ...

    def pin(self, tenant: str, adapter: str, version: str | None) -> str:
        """Serve ``version`` from now on, whatever is published later (None: the newest,
        now and later); the version current now. An unknown version is ``NotFound``."""
        ...

    def pinned(self, tenant: str, adapter: str) -> str | None:
        """The version pinned, or None when the newest is served."""
        ...

    def manifest(self, tenant: str, adapter: str, version: str) -> dict[str, Any] | None:
        """The manifest ``version`` was published with, or None."""
        ...

    def size(self, tenant: str, adapter: str, version: str) -> int:
        """The bytes ``version`` holds."""
        ...

    def remove_version(self, tenant: str, adapter: str, version: str) -> None:
        """``version``'s bytes gone; refused (``FailedPrecondition``) for the current one,
        ``NotFound`` for one not held. Only once nothing serves it."""
        ...

    def current(self, tenant: str, adapter: str) -> str | None:
        """The version ``<tenant>/<adapter>`` serves, or None."""
        ...

    def versions(self, tenant: str, adapter: str) -> list[str]:
        """Every version held, oldest first."""
        ...

    def names(self, tenant: str) -> list[str]:
        """The tenant's adapter names that hold a version."""
        ...

    def fetch(self, tenant: str, adapter: str, version: str) -> Path | None:
        """A local folder holding ``version`` whole, for vLLM to read, or None."""
        ...

    def sweep_unfinished(self, older_than_s: float = 3600) -> list[str]:
        """Remove what publishes that died half-way left; return the versions swept."""
        ...

    def unpublish(self, tenant: str, adapter: str) -> None:
        """The name stops resolving (its versions stay until ``remove``)."""
        ...

    def unpublished(self) -> list[tuple[str, str]]:
        """Every (tenant, adapter) holding versions that no name serves."""
        ...

    def remove(self, tenant: str, adapter: str) -> None:
        """Every version's bytes gone: only once nothing serves them."""
        ...


class LocalAdapterStore:
    """Adapter versions as folders on the shared volume (``trainer.layout``)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def publish(self, tenant: str, adapter: str, src: Path, manifest: dict[str, Any]) -> str:
        version = self._version_of_job(tenant, adapter, manifest["job_id"])
        if version is None:
            version = self._write_version(tenant, adapter, src, manifest)
        current = self.pinned(tenant, adapter) or version
        write_atomic(self.layout.adapter_dir(tenant, adapter) / CURRENT, current.encode())
        return version

    def pin(self, tenant: str, adapter: str, version: str | None) -> str:
        held = self.versions(tenant, adapter)
        if not held:
            raise NotFound(f"adapter {adapter!r} not found")
        folder = self.layout.adapter_dir(tenant, adapter)
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                (folder / PINNED).unlink()
            current = held[-1]
        elif version not in held:
            raise NotFound(f"version: {adapter!r} has no version {version!r}; it has {held}")
        else:
            write_atomic(folder / PINNED, version.encode())
            current = version
        write_atomic(folder / CURRENT, current.encode())
        return current

    def pinned(self, tenant: str, adapter: str) -> str | None:
        return self.layout.pinned_version(tenant, adapter)

    def manifest(self, tenant: str, adapter: str, version: str) -> dict[str, Any] | None:
        path = self.layout.version_dir(tenant, adapter, version) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def size(self, tenant: str, adapter: str, version: str) -> int:
        folder = self.layout.version_dir(tenant, adapter, version)
        try:
            return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        except FileNotFoundError:  # removed meanwhile
            return 0

    def remove_version(self, tenant: str, adapter: str, version: str) -> None:
        if version not in self.versions(tenant, adapter):
            raise NotFound(f"version: {adapter!r} has no version {version!r}")
        if version in (self.current(tenant, adapter), self.pinned(tenant, adapter)):
            raise FailedPrecondition(
                f"version: {version} is the one {tenant}/{adapter} serves; pin another "
                "version first, or delete the adapter"
            )
        self._trash(self.layout.version_dir(tenant, adapter, version))

    def _version_of_job(self, tenant: str, adapter: str, job_id: str) -> str | None:
        for version in self.versions(tenant, adapter):
            path = self.layout.version_dir(tenant, adapter, version) / MANIFEST
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                if json.loads(path.read_text()).get("job_id") == job_id:
                    return version
        return None

    def _write_version(self, tenant: str, adapter: str, src: Path, manifest: dict) -> str:
        """Built in ``adapters/.staging`` (the same filesystem), every file fsynced, then
        renamed into place: nothing can see half a version."""
        stage = self.layout.staging / uuid.uuid4().hex
        try:
            stage.mkdir()
            for item in sorted(src.iterdir()):
                if item.is_file() and not item.name.startswith("."):
                    shutil.copyfile(item, stage / item.name)
            (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            for item in stage.iterdir():
                with open(item, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(stage)
            parent = self.layout.adapter_dir(tenant, adapter)
            parent.mkdir(parents=True, exist_ok=True)
            versions = self.versions(tenant, adapter)
            version = f"v{int(versions[-1][1:]) + 1 if versions else 1:04d}"
            os.rename(stage, parent / version)  # fails rather than replace an existing version
            fsync_dir(parent)
            return version
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def current(self, tenant: str, adapter: str) -> str | None:
        return self.layout.current_version(tenant, adapter)

    def versions(self, tenant: str, adapter: str) -> list[str]:
        return self.layout.versions(tenant, adapter)

    def names(self, tenant: str) -> list[str]:
        try:
            folder = self.layout.adapters / check_name(tenant, "tenant")
            return sorted(p.name for p in folder.iterdir() if p.is_dir())
        except (InvalidArgument, OSError):
            return []

    def fetch(self, tenant: str, adapter: str, version: str) -> Path | None:
        path = self.layout.version_dir(tenant, adapter, version)
        if not (path / "adapter_config.json").is_file():
            return None
        # A symlink planted under DATA must not lead the server outside it.
        try:
            if not path.resolve().is_relative_to(self.layout.adapters.resolve()):
                log.warning("%s/%s %s leads outside %s; refused", tenant, adapter, version,
                            self.layout.adapters)  # fmt: skip
                return None
        except OSError:
            return None
        return path

    def sweep_unfinished(self, older_than_s: float = 3600) -> list[str]:
        return []  # a local publish stages beside its place: ``Layout.sweep`` removes those

    def unpublish(self, tenant: str, adapter: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.layout.adapter_dir(tenant, adapter) / CURRENT).unlink()

    def unpublished(self) -> list[tuple[str, str]]:
        found = []
        for tenant_dir in sorted(self.layout.adapters.iterdir()):
            if tenant_dir.name.startswith(".") or not tenant_dir.is_dir():
                continue
            for name in self.names(tenant_dir.name):
                if self.versions(tenant_dir.name, name) and not self.current(tenant_dir.name, name):
                    found.append((tenant_dir.name, name))
        return found

    def remove(self, tenant: str, adapter: str) -> None:
        self._trash(self.layout.adapter_dir(tenant, adapter))

    def _trash(self, folder: Path) -> None:
        """Renamed out of sight at once (a reader sees all of it or none), then deleted."""
        trash = self.layout.staging / f"deleted-{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
