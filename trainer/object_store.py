"""Adapter versions in S3-compatible object storage, for several hosts.

``S3AdapterStore`` keeps ``trainer.adapter_store.LocalAdapterStore``'s rules with objects::

    <prefix><tenant>/<adapter>/<version>/.claim        who took the number (written first)
    <prefix><tenant>/<adapter>/<version>/<file>        adapter and tokenizer files
    <prefix><tenant>/<adapter>/<version>/manifest.json written last: the version is whole
    <prefix><tenant>/<adapter>/current                 the version served
    <prefix><tenant>/<adapter>/pinned                  the version pinned, if any

Every object of a version is created once (``If-None-Match: *``; the server refuses a
second write), so a version never changes once named. The ``.claim`` decides a race: two
publishers that chose the same number both try to create it, and the loser takes the next
number before it wrote anything. A version without ``manifest.json`` (a publish that
crashed) is never listed or served, and the trainer's start removes its files once they
are an hour old (``sweep_unfinished``); its number stays taken, as does a removed version's
(its claim is kept), so a number never names two versions. Pointers move last, as on the
local volume. Deleting takes the manifest away first, so readers see a version whole or
not at all.

``fetch`` copies a version into a local cache (``<cache>/<tenant>/<adapter>/<version>``,
downloaded beside it and renamed into place) for vLLM to read. The cached copy is reused
while the store's manifest carries the same publish id (a name deleted and published again
gets new ids, so an old copy is never served as the new one); downloads a killed process
left there are swept once an hour old. Storage that does not answer is ``Unavailable``,
naming the endpoint, the operation and the key.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from trainer.adapter_store import MANIFEST, AdapterStore, LocalAdapterStore
from trainer.bucket import Bucket, Taken
from trainer.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from trainer.layout import CURRENT, PINNED, VERSION_RE, Layout
from trainer.names import check_name

CLAIM = ".claim"
# Kept in the cached copy: the publish id of the manifest it was downloaded from.
CACHE_ID = ".publish-id"


class S3AdapterStore:
    """Adapter versions as objects under ``s3://<bucket>/<prefix>``."""

    def __init__(self, s3: Bucket, *, cache_dir: Path) -> None:
        self.s3, self.prefix, self.cache = s3, s3.prefix, Path(cache_dir)
        self._sweep_cache()

    def _sweep_cache(self, older_than_s: float = 3600) -> None:
        """Remove downloads a killed process left in the cache. Only old ones: another
        process (vLLM's API server and engine share the cache) may be fetching now."""
        cutoff = time.time() - older_than_s
        for pattern in ("*/*/*.tmp-*", "*/*/*.deleted-*"):
            for leftover in self.cache.glob(pattern):
                with contextlib.suppress(OSError):
                    if leftover.lstat().st_mtime < cutoff:
                        shutil.rmtree(leftover, ignore_errors=True)

    # ------------------------------------------------------------------ keys and calls
    def _key(self, tenant: str, adapter: str, version: str = "", name: str = "") -> str:
        """The key of ``<tenant>/<adapter>[/<version>][/<name>]``: every part validated
        before it is joined (``name`` is one of ours or a file of the publisher's folder)."""
        key = f"{self.prefix}{check_name(tenant, 'tenant')}/{check_name(adapter, 'adapter_name')}"
        if version:
            if not VERSION_RE.fullmatch(version):
                raise InvalidArgument("version", f"{version!r} is not a version like 'v0001'")
            key += "/" + version
        return key + "/" + name if name else key

    def _scan(self, tenant: str, adapter: str) -> tuple[list[str], int, list[str]]:
        """Whole versions (oldest first), the highest number taken, and every key."""
        base = self._key(tenant, adapter) + "/"
        keys = [obj["Key"] for obj in self.s3.objects(base)]
        whole, highest = set(), 0
        for key in keys:
            version, _, name = key[len(base) :].partition("/")
            if VERSION_RE.fullmatch(version):
                highest = max(highest, int(version[1:]))
                if name == MANIFEST:
                    whole.add(version)
        return sorted(whole, key=lambda v: int(v[1:])), highest, keys

    def _pointer(self, tenant: str, adapter: str, name: str) -> str | None:
        data = self.s3.get(self._key(tenant, adapter, name=name))
        version = data.decode(errors="replace").strip() if data is not None else ""
        return version if VERSION_RE.fullmatch(version) else None

    # ------------------------------------------------------------------ the Protocol
    def publish(self, tenant: str, adapter: str, src: Path, manifest: dict[str, Any]) -> str:
        version = self._version_of_job(tenant, adapter, manifest["job_id"])
        if version is None:
            version = self._write_version(tenant, adapter, src, manifest)
        current = self.pinned(tenant, adapter) or version
        self.s3.put(self._key(tenant, adapter, name=CURRENT), current.encode())
        return version

    def _version_of_job(self, tenant: str, adapter: str, job_id: str) -> str | None:
        for version in self.versions(tenant, adapter):
            if (self.manifest(tenant, adapter, version) or {}).get("job_id") == job_id:
                return version
        return None

    def _write_version(self, tenant: str, adapter: str, src: Path, manifest: dict) -> str:
        files = [p for p in sorted(src.iterdir()) if p.is_file() and not p.name.startswith(".")]
        publish_id = uuid.uuid4().hex
        _, number, _ = self._scan(tenant, adapter)
        while True:
            number += 1
            version = f"v{number:04d}"
            try:
                claim = json.dumps({"job_id": manifest["job_id"], "publish_id": publish_id})
                self.s3.put(self._key(tenant, adapter, version, CLAIM), claim.encode(), create=True)
            except Taken:
                continue  # another publisher took this number: the next one
            break
        try:
            for path in files:
                with open(path, "rb") as f:
                    self.s3.put(self._key(tenant, adapter, version, path.name), f, create=True)
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            self.s3.put(self._key(tenant, adapter, version, MANIFEST), body, create=True,
                      Metadata={"publish-id": publish_id})  # fmt: skip
        except Taken as e:  # only a writer ignoring the claim gets here; retrying is safe
            raise Unavailable(f"{e} was written by another publisher; publish again") from e
        return version

    def pin(self, tenant: str, adapter: str, version: str | None) -> str:
        held = self.versions(tenant, adapter)
        if not held:
            raise NotFound(f"adapter {adapter!r} not found")
        if version is None:
            self.s3.delete([self._key(tenant, adapter, name=PINNED)])
            current = held[-1]
        elif version not in held:
            raise NotFound(f"version: {adapter!r} has no version {version!r}; it has {held}")
        else:
            self.s3.put(self._key(tenant, adapter, name=PINNED), version.encode())
            current = version
        self.s3.put(self._key(tenant, adapter, name=CURRENT), current.encode())
        return current

    def pinned(self, tenant: str, adapter: str) -> str | None:
        return self._pointer(tenant, adapter, PINNED)

    def manifest(self, tenant: str, adapter: str, version: str) -> dict[str, Any] | None:
        data = self.s3.get(self._key(tenant, adapter, version, MANIFEST))
        try:
            found = json.loads(data) if data is not None else None
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    def size(self, tenant: str, adapter: str, version: str) -> int:
        prefix = self._key(tenant, adapter, version) + "/"
        return sum(o["Size"] for o in self.s3.objects(prefix) if o["Key"] != prefix + CLAIM)

    def remove_version(self, tenant: str, adapter: str, version: str) -> None:
        prefix = self._key(tenant, adapter, version) + "/"
        held, _, keys = self._scan(tenant, adapter)
        if version not in held:
            raise NotFound(f"version: {adapter!r} has no version {version!r}")
        if version in (self.current(tenant, adapter), self.pinned(tenant, adapter)):
            raise FailedPrecondition(
                f"version: {version} is the one {tenant}/{adapter} serves; pin another "
                "version first, or delete the adapter"
            )
        self.s3.delete([prefix + MANIFEST])  # gone for readers at once
        # The claim stays: the number is never taken again (caches key on it).
        self.s3.delete([k for k in keys if k.startswith(prefix) and k[len(prefix) :] != CLAIM])

    def current(self, tenant: str, adapter: str) -> str | None:
        return self._pointer(tenant, adapter, CURRENT)

    def versions(self, tenant: str, adapter: str) -> list[str]:
        return self._scan(tenant, adapter)[0]

    def names(self, tenant: str) -> list[str]:
        try:
            prefix = self.prefix + check_name(tenant, "tenant") + "/"
        except InvalidArgument:
            return []
        return sorted({a for t, a in self._whole(prefix) if t == tenant})

    def _whole(self, prefix: str) -> set[tuple[str, str]]:
        """(tenant, adapter) of every whole version under ``prefix``."""
        found = set()
        for obj in self.s3.objects(prefix):
            parts = obj["Key"][len(self.prefix) :].split("/")
            if len(parts) == 4 and parts[3] == MANIFEST and VERSION_RE.fullmatch(parts[2]):
                found.add((parts[0], parts[1]))
        return found

    def fetch(self, tenant: str, adapter: str, version: str) -> Path | None:
        prefix = self._key(tenant, adapter, version) + "/"
        head = self.s3.call("head_object", prefix + MANIFEST, Key=prefix + MANIFEST)
        if head is None:
            return None  # not published whole, or removed
        publish_id = head.get("Metadata", {}).get("publish-id", head.get("ETag", ""))
        folder = self.cache / tenant / adapter / version
        if _cached_id(folder) == publish_id:
            return folder
        # Only plain file names come down: nothing a key holds can lead out of the folder.
        objects = {
            o["Key"][len(prefix) :]: o["Size"]
            for o in self.s3.objects(prefix)
            if "/" not in o["Key"][len(prefix) :] and not o["Key"][len(prefix) :].startswith(".")
        }
        if "adapter_config.json" not in objects or MANIFEST not in objects:
            return None
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f"{version}.tmp-{uuid.uuid4().hex}")
        try:
            tmp.mkdir()
            for name, size in objects.items():
                self.s3.download(prefix + name, tmp / name, size)
            (tmp / CACHE_ID).write_text(publish_id)
            if folder.exists() and _cached_id(folder) != publish_id:
                _remove(folder)  # a copy of what the name held before it was published again
            with contextlib.suppress(OSError):  # another process renamed its copy first
                os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder if _cached_id(folder) == publish_id else None

    def sweep_unfinished(self, older_than_s: float = 3600) -> list[str]:
        """Remove the files of versions a killed publisher left without a manifest, once
        they are ``older_than_s`` old (younger ones may be a publish still going on, on
        another host); their claims stay, so the numbers are never taken again. Returns
        ``<tenant>/<adapter>/<version>`` of each version swept."""
        cutoff = time.time() - older_than_s
        found: dict[str, tuple[list[str], bool, float]] = {}
        for obj in self.s3.objects(self.prefix):
            parts = obj["Key"][len(self.prefix) :].split("/")
            if len(parts) != 4 or not VERSION_RE.fullmatch(parts[2]):
                continue
            keys, whole, newest = found.get("/".join(parts[:3]), ([], False, 0.0))
            if parts[3] != CLAIM:
                keys.append(obj["Key"])
            newest = max(newest, obj["LastModified"].timestamp())
            found["/".join(parts[:3])] = (keys, whole or parts[3] == MANIFEST, newest)
        swept = [v for v, (keys, whole, newest) in found.items()
                 if keys and not whole and newest < cutoff]  # fmt: skip
        for version in swept:
            self.s3.delete(found[version][0])
        return sorted(swept)

    def unpublish(self, tenant: str, adapter: str) -> None:
        self.s3.delete([self._key(tenant, adapter, name=CURRENT)])

    def unpublished(self) -> list[tuple[str, str]]:
        return sorted((t, a) for t, a in self._whole(self.prefix) if self.current(t, a) is None)

    def remove(self, tenant: str, adapter: str) -> None:
        keys = self._scan(tenant, adapter)[2]
        self.s3.delete(
            [self._key(tenant, adapter, name=CURRENT), self._key(tenant, adapter, name=PINNED)]
        )
        self.s3.delete([k for k in keys if k.endswith("/" + MANIFEST)])
        self.s3.delete(keys)


def _cached_id(folder: Path) -> str | None:
    with contextlib.suppress(OSError):
        return (folder / CACHE_ID).read_text()
    return None


def _remove(folder: Path) -> None:
    """Renamed aside at once (a reader sees all of it or none), then deleted."""
    trash = folder.with_name(f"{folder.name}.deleted-{uuid.uuid4().hex}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)


def adapter_store_from_url(url: str, layout: Layout, cache_dir: Path) -> AdapterStore:
    """The store ``url`` names: "" for the local volume (``layout``), or
    ``s3://bucket/prefix`` (``Bucket.from_url`` says where the endpoint comes from)."""
    if not url:
        return LocalAdapterStore(layout)
    return S3AdapterStore(Bucket.from_url(url, "adapter_store"), cache_dir=cache_dir)
