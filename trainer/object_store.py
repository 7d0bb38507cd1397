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
crashed) is never listed or served; its number stays taken, as does a removed version's
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from trainer.adapter_store import MANIFEST, AdapterStore, LocalAdapterStore
from trainer.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from trainer.layout import CURRENT, PINNED, VERSION_RE, Layout
from trainer.names import check_name

CLAIM = ".claim"
# Kept in the cached copy: the publish id of the manifest it was downloaded from.
CACHE_ID = ".publish-id"
ENV_ENDPOINT = ("FINETUNE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
_MISSING = ("404", "NoSuchKey", "NotFound")  # HEAD answers the bare status
_TAKEN = ("412", "PreconditionFailed", "409", "ConditionalRequestConflict")
_CHUNK = 1 << 20


class _Taken(Exception):
    """A create-only write found the key already there."""


class S3AdapterStore:
    """Adapter versions as objects under ``s3://<bucket>/<prefix>``."""

    def __init__(
        self,
        bucket: str,
        *,
        cache_dir: Path,
        prefix: str = "",
        endpoint_url: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
        connect_timeout: float = 5,
        read_timeout: float = 60,
        attempts: int = 3,
    ) -> None:
        import boto3  # here: the vLLM plugin imports this module, boto3 only when used
        from botocore.config import Config

        self.bucket, self.cache = bucket, Path(cache_dir)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint_url or "the default AWS endpoint"
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=region or os.environ.get("AWS_REGION") or "us-east-1",
            config=Config(
                s3={"addressing_style": "path"},  # radosgw and most S3 servers off AWS
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": attempts, "mode": "standard"},
                # Checksum trailers (boto3 >= 1.36) are not understood by every S3 server.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
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

    def _call(self, operation: str, key: str, **kwargs: Any) -> Any:
        """One S3 call; None for a missing key, ``_Taken`` for a refused create-only write,
        ``Unavailable`` for anything else the storage did not do."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _MISSING:  # a missing bucket is not a missing key: NoSuchBucket
                return None
            if code in _TAKEN or status in _TAKEN:
                raise _Taken(key) from None
            raise Unavailable(
                f"object storage at {self.endpoint} refused {operation} of "
                f"s3://{self.bucket}/{key}: {code or status} {err.get('Message') or ''}".strip()
            ) from e
        except BotoCoreError as e:
            raise Unavailable(
                f"object storage at {self.endpoint} did not answer {operation} of "
                f"s3://{self.bucket}/{key}: {e}"
            ) from e

    def _get(self, key: str) -> bytes | None:
        found = self._call("get_object", key, Key=key)
        return None if found is None else self._read(key, found["Body"])

    def _read(self, key: str, body: Any) -> bytes:
        from botocore.exceptions import BotoCoreError

        try:
            return bytes(body.read())
        except (BotoCoreError, OSError) as e:
            raise Unavailable(f"object storage at {self.endpoint}: reading {key}: {e}") from e

    def _put(self, key: str, body: Any, *, create: bool = False, **extra: Any) -> None:
        if create:
            extra["IfNoneMatch"] = "*"
        self._call("put_object", key, Key=key, Body=body, **extra)

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under ``prefix`` (key and size)."""
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", prefix, Prefix=prefix, **token) or {}
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def _delete(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            done = self._call("delete_objects", keys[i], Delete={"Objects": batch, "Quiet": True})
            if failed := (done or {}).get("Errors"):  # a batch answers per key
                first = failed[0]
                raise Unavailable(
                    f"object storage at {self.endpoint} kept {len(failed)} of the objects to "
                    f"delete, e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def _scan(self, tenant: str, adapter: str) -> tuple[list[str], int, list[str]]:
        """Whole versions (oldest first), the highest number taken, and every key."""
        base = self._key(tenant, adapter) + "/"
        keys = [obj["Key"] for obj in self._list(base)]
        whole, highest = set(), 0
        for key in keys:
            version, _, name = key[len(base) :].partition("/")
            if VERSION_RE.fullmatch(version):
                highest = max(highest, int(version[1:]))
                if name == MANIFEST:
                    whole.add(version)
        return sorted(whole, key=lambda v: int(v[1:])), highest, keys

    def _pointer(self, tenant: str, adapter: str, name: str) -> str | None:
        data = self._get(self._key(tenant, adapter, name=name))
        version = data.decode(errors="replace").strip() if data is not None else ""
        return version if VERSION_RE.fullmatch(version) else None

    # ------------------------------------------------------------------ the Protocol
    def publish(self, tenant: str, adapter: str, src: Path, manifest: dict[str, Any]) -> str:
        version = self._version_of_job(tenant, adapter, manifest["job_id"])
        if version is None:
            version = self._write_version(tenant, adapter, src, manifest)
        current = self.pinned(tenant, adapter) or version
        self._put(self._key(tenant, adapter, name=CURRENT), current.encode())
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
                self._put(self._key(tenant, adapter, version, CLAIM), claim.encode(), create=True)
            except _Taken:
                continue  # another publisher took this number: the next one
            break
        try:
            for path in files:
                with open(path, "rb") as f:
                    self._put(self._key(tenant, adapter, version, path.name), f, create=True)
            body = json.dumps(manifest, indent=2, sort_keys=True).encode()
            self._put(self._key(tenant, adapter, version, MANIFEST), body, create=True,
                      Metadata={"publish-id": publish_id})  # fmt: skip
        except _Taken as e:  # only a writer ignoring the claim gets here; retrying is safe
            raise Unavailable(f"{e} was written by another publisher; publish again") from e
        return version

    def pin(self, tenant: str, adapter: str, version: str | None) -> str:
        held = self.versions(tenant, adapter)
        if not held:
            raise NotFound(f"adapter {adapter!r} not found")
        if version is None:
            self._delete([self._key(tenant, adapter, name=PINNED)])
            current = held[-1]
        elif version not in held:
            raise NotFound(f"version: {adapter!r} has no version {version!r}; it has {held}")
        else:
            self._put(self._key(tenant, adapter, name=PINNED), version.encode())
            current = version
        self._put(self._key(tenant, adapter, name=CURRENT), current.encode())
        return current

    def pinned(self, tenant: str, adapter: str) -> str | None:
        return self._pointer(tenant, adapter, PINNED)

    def manifest(self, tenant: str, adapter: str, version: str) -> dict[str, Any] | None:
        data = self._get(self._key(tenant, adapter, version, MANIFEST))
        try:
            found = json.loads(data) if data is not None else None
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    def size(self, tenant: str, adapter: str, version: str) -> int:
        prefix = self._key(tenant, adapter, version) + "/"
        return sum(o["Size"] for o in self._list(prefix) if o["Key"] != prefix + CLAIM)

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
        self._delete([prefix + MANIFEST])  # gone for readers at once
        # The claim stays: the number is never taken again (caches key on it).
        self._delete([k for k in keys if k.startswith(prefix) and k[len(prefix) :] != CLAIM])

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
        for obj in self._list(prefix):
            parts = obj["Key"][len(self.prefix) :].split("/")
            if len(parts) == 4 and parts[3] == MANIFEST and VERSION_RE.fullmatch(parts[2]):
                found.add((parts[0], parts[1]))
        return found

    def fetch(self, tenant: str, adapter: str, version: str) -> Path | None:
        prefix = self._key(tenant, adapter, version) + "/"
        head = self._call("head_object", prefix + MANIFEST, Key=prefix + MANIFEST)
        if head is None:
            return None  # not published whole, or removed
        publish_id = head.get("Metadata", {}).get("publish-id", head.get("ETag", ""))
        folder = self.cache / tenant / adapter / version
        if _cached_id(folder) == publish_id:
            return folder
        # Only plain file names come down: nothing a key holds can lead out of the folder.
        objects = {
            o["Key"][len(prefix) :]: o["Size"]
            for o in self._list(prefix)
            if "/" not in o["Key"][len(prefix) :] and not o["Key"][len(prefix) :].startswith(".")
        }
        if "adapter_config.json" not in objects or MANIFEST not in objects:
            return None
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f"{version}.tmp-{uuid.uuid4().hex}")
        try:
            tmp.mkdir()
            for name, size in objects.items():
                self._download(prefix + name, tmp / name, size)
            (tmp / CACHE_ID).write_text(publish_id)
            if folder.exists() and _cached_id(folder) != publish_id:
                _remove(folder)  # a copy of what the name held before it was published again
            with contextlib.suppress(OSError):  # another process renamed its copy first
                os.rename(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder if _cached_id(folder) == publish_id else None

    def _download(self, key: str, dest: Path, size: int) -> None:
        found = self._call("get_object", key, Key=key)
        if found is None:
            raise Unavailable(f"{key} vanished while being fetched")
        from botocore.exceptions import BotoCoreError

        written = 0
        try:
            with open(dest, "wb") as f:
                for chunk in found["Body"].iter_chunks(_CHUNK):
                    f.write(chunk)
                    written += len(chunk)
        except BotoCoreError as e:
            raise Unavailable(f"object storage at {self.endpoint}: reading {key}: {e}") from e
        if written != size:
            raise Unavailable(f"{key}: got {written} bytes of {size}")

    def unpublish(self, tenant: str, adapter: str) -> None:
        self._delete([self._key(tenant, adapter, name=CURRENT)])

    def unpublished(self) -> list[tuple[str, str]]:
        return sorted((t, a) for t, a in self._whole(self.prefix) if self.current(t, a) is None)

    def remove(self, tenant: str, adapter: str) -> None:
        keys = self._scan(tenant, adapter)[2]
        self._delete(
            [self._key(tenant, adapter, name=CURRENT), self._key(tenant, adapter, name=PINNED)]
        )
        self._delete([k for k in keys if k.endswith("/" + MANIFEST)])
        self._delete(keys)


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
    ``s3://bucket/prefix`` with the endpoint from ``FINETUNE_S3_ENDPOINT_URL`` or
    ``AWS_ENDPOINT_URL`` (AWS itself when neither is set) and the usual AWS credentials."""
    if not url:
        return LocalAdapterStore(layout)
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise InvalidArgument("adapter_store", f"{url!r} is neither empty nor s3://bucket/prefix")
    endpoint = next((os.environ[e] for e in ENV_ENDPOINT if os.environ.get(e)), None)
    return S3AdapterStore(
        parsed.netloc, cache_dir=cache_dir, prefix=parsed.path, endpoint_url=endpoint
    )
