"""Where published adapters live: immutable version folders and a pointer to the current one.

``AdapterStore`` is the seam: the trainer publishes through it (``trainer.service.publish``) and the
vLLM plugin finds and fetches through it (``server.adapters``). ``LocalAdapterStore``, the
one implementation today, keeps them on the shared volume::

    DATA/adapters/<tenant>/<adapter>/<version>/   adapter, tokenizer, manifest.json
    DATA/adapters/<tenant>/<adapter>/current      names the current version

Its rules, whatever holds the bytes (object storage, for several hosts, keeps them too):
a version is written whole before anything can name it, and never modified afterwards
(vLLM re-reads a folder after evicting it from its CPU cache); the current pointer moves
last. This module is imported by the vLLM plugin too, so it stays free of heavy imports.
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

from trainer.errors import InvalidArgument
from trainer.layout import CURRENT, Layout, fsync_dir, write_atomic
from trainer.names import check_name

log = logging.getLogger("vllm.finetune.adapter_store")  # also logged inside vLLM

MANIFEST = "manifest.json"


class AdapterStore(Protocol):
    def publish(self, tenant: str, adapter: str, src: Path, manifest: dict[str, Any]) -> str:
        """``src`` (an adapter's folder) with ``manifest`` as the next version, then the
        current one; the version. A job that published already (a restart mid-publish)
        gets its own version back, named current again, not a second one."""
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

    def unpublish(self, tenant: str, adapter: str) -> None:
        """The name stops resolving (its versions stay until ``remove``)."""
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
        write_atomic(self.layout.adapter_dir(tenant, adapter) / CURRENT, version.encode())
        return version

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

    def unpublish(self, tenant: str, adapter: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.layout.adapter_dir(tenant, adapter) / CURRENT).unlink()

    def remove(self, tenant: str, adapter: str) -> None:
        trash = self.layout.staging / f"deleted-{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.layout.adapter_dir(tenant, adapter), trash)
            shutil.rmtree(trash, ignore_errors=True)
