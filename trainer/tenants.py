"""Tenants and their API keys; only the keys' hashes are stored.

On one host (or hosts sharing a volume) they are one JSON file (``TenantFile``); the
trainer and the vLLM middleware read the same file and reload it when it changes on disk,
so ``python -m trainer tenant add`` takes effect without a restart. Hosts that share no
volume keep them in object storage (``--tenants-store s3://BUCKET/PREFIX``,
``TenantObjects``): one object per tenant, ``<prefix>tenants/<folded name>.json``, created
only if absent (the storage itself refuses a second tenant of the same folded name), and
every reader polls the listing in the background (``refresh_s``, 5 s): a tenant added or
removed on one host counts everywhere within that time. Storage that does not answer
leaves every reader with what it last read; one that never read anything answers
``Unavailable``.

Keys are 256-bit random tokens, so a plain SHA-256 is a sufficient hash (a slow password
hash guards low-entropy secrets, which these are not).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.bucket import Bucket, Taken
from trainer.errors import AlreadyExists, NotFound, Unavailable
from trainer.layout import write_atomic
from trainer.names import check_name, fold

KEY_PREFIX = "ft-"

log = logging.getLogger(__name__)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool
    created_at: float


class TenantFile:
    """The tenants as one JSON file, replaced whole on every change."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def stamp(self) -> Any:
        """Changes whenever the records may have."""
        try:
            st = os.stat(self.path)
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            return (0, 0, 0)

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"tenants": {}}

    def read(self) -> dict[str, dict]:
        return dict(self._load().get("tenants", {}))

    def create(self, name: str, record: dict) -> None:
        data = self._load()
        tenants = data.setdefault("tenants", {})
        if any(fold(n) == fold(name) for n in tenants):
            raise AlreadyExists(f"tenant {name!r} exists")
        tenants[name] = record
        self._write(data)

    def delete(self, name: str) -> None:
        data = self._load()
        if name not in data.get("tenants", {}):
            raise NotFound(f"tenant {name!r} not found")
        del data["tenants"][name]
        self._write(data)

    def _write(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True).encode())
        os.chmod(self.path, 0o600)


class TenantObjects:
    """The tenants as objects, one each, read by a background poll of their listing."""

    def __init__(self, s3: Bucket, refresh_s: float = 5.0) -> None:
        self.s3, self.refresh_s = s3, refresh_s
        self.prefix = f"{s3.prefix}tenants/"
        self._etags: dict[str, str] = {}  # key -> ETag of what _records holds
        self._records: dict[str, tuple[str, dict]] = {}  # key -> (name, record)
        self._generation = 0
        self._loaded = False
        self._error: Unavailable | None = None
        self._lock = threading.Lock()  # swaps what was read
        self._starting = threading.Lock()  # the first read, and the poller's start
        self._poller: threading.Thread | None = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}{fold(check_name(name, 'tenant'))}.json"

    def poll(self) -> None:
        """Read the listing; fetch what is new or changed, drop what is gone."""
        listed = {
            o["Key"]: o["ETag"] for o in self.s3.objects(self.prefix) if o["Key"].endswith(".json")
        }
        if self._loaded and listed == self._etags:
            self._error = None  # answered: a later outage is logged again
            return
        records, etags = {}, {}
        for key, etag in listed.items():
            if self._etags.get(key) == etag:
                records[key], etags[key] = self._records[key], etag
                continue
            body = self.s3.get(key)
            if body is None:
                continue  # removed since the listing
            rec = json.loads(body)
            records[key], etags[key] = (rec.pop("name"), rec), etag
        with self._lock:
            self._records, self._etags = records, etags
            self._generation += 1
            self._loaded, self._error = True, None

    def _poll_forever(self) -> None:
        while True:
            time.sleep(self.refresh_s)
            try:
                self.poll()
            except Exception as e:  # storage away: keep what was read, try again
                if self._error is None:
                    log.warning("tenants not refreshed from object storage: %s", e)
                self._error = e if isinstance(e, Unavailable) else Unavailable(str(e))

    def stamp(self) -> Any:
        if self._poller is None:
            with self._starting:
                if self._poller is None:
                    try:
                        self.poll()
                    except Unavailable as e:
                        self._error = e
                    self._poller = threading.Thread(
                        target=self._poll_forever, name="tenants", daemon=True
                    )
                    self._poller.start()
        if not self._loaded:
            raise self._error or Unavailable("the tenants are not read yet")
        return self._generation

    def read(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._records.values())

    def create(self, name: str, record: dict) -> None:
        body = json.dumps({"name": name, **record}, sort_keys=True).encode()
        try:
            self.s3.put(self._key(name), body, create=True)
        except Taken:
            raise AlreadyExists(f"tenant {name!r} exists") from None
        self.poll()

    def delete(self, name: str) -> None:
        key = self._key(name)
        body = self.s3.get(key)
        if body is None or json.loads(body).get("name") != name:
            raise NotFound(f"tenant {name!r} not found")
        self.s3.delete([key])
        self.poll()


class TenantRegistry:
    """Reads and writes the tenants file; cheap to call per request."""

    def __init__(self, source: Path | str | TenantFile | TenantObjects) -> None:
        if not isinstance(source, TenantFile | TenantObjects):
            source = TenantFile(Path(source))
        self.source = source
        self._stamp: Any = None
        self._by_hash: dict[str, Tenant] = {}
        self._tenants: dict[str, Tenant] = {}

    # ------------------------------------------------------------ reading
    def _refresh(self) -> None:
        stamp = self.source.stamp()
        if stamp == self._stamp:
            return
        tenants: dict[str, Tenant] = {}
        by_hash: dict[str, Tenant] = {}
        for name, rec in self.source.read().items():
            t = Tenant(name=name, admin=bool(rec.get("admin")), created_at=rec.get("created_at", 0))
            tenants[name] = t
            for h in rec.get("key_sha256", []):
                by_hash[h] = t
        self._tenants, self._by_hash, self._stamp = tenants, by_hash, stamp

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning ``key``, or None. Constant-time in the key's hash."""
        self._refresh()
        if not key:
            return None
        h = hash_key(key)
        for stored, tenant in self._by_hash.items():
            if hmac.compare_digest(stored, h):
                return tenant
        return None

    def get(self, name: str) -> Tenant | None:
        self._refresh()
        return self._tenants.get(name)

    def list(self) -> list[Tenant]:
        self._refresh()
        return sorted(self._tenants.values(), key=lambda t: t.name)

    # ------------------------------------------------------------ writing
    def add(self, name: str, admin: bool = False) -> str:
        """Create a tenant and return its API key; only the key's hash is stored."""
        check_name(name, "tenant")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = {"key_sha256": [hash_key(key)], "admin": admin, "created_at": time.time()}
        self.source.create(name, record)
        self._stamp = None
        return key

    def remove(self, name: str) -> None:
        self.source.delete(name)
        self._stamp = None


def tenant_registry(tenants_file: Path | None, tenants_store: str) -> TenantRegistry:
    """The tenants ``tenants_store`` names (``s3://BUCKET/PREFIX``), or else the file."""
    if tenants_store:
        return TenantRegistry(TenantObjects(Bucket.from_url(tenants_store, "tenants_store")))
    if tenants_file is None:
        raise ValueError("neither a tenants file nor a tenants store")
    return TenantRegistry(tenants_file)
