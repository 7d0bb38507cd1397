"""Tenants and their API keys, kept in one JSON file that stores only key hashes.

The trainer and the vLLM middleware read the same file; both reload it when it
changes on disk, so ``python -m trainer tenant add`` takes effect without a
restart. Keys are 256-bit random tokens, so a plain SHA-256 is a sufficient
hash (a slow password hash guards low-entropy secrets, which these are not).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import AlreadyExists, NotFound
from trainer.layout import write_atomic
from trainer.names import check_name, fold

KEY_PREFIX = "ft-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    admin: bool
    created_at: float


class TenantRegistry:
    """Reads and writes the tenants file; cheap to call per request."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._by_hash: dict[str, Tenant] = {}
        self._tenants: dict[str, Tenant] = {}

    # ------------------------------------------------------------ reading
    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"tenants": {}}

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._stamp:
            return
        data = self._load()
        tenants: dict[str, Tenant] = {}
        by_hash: dict[str, Tenant] = {}
        for name, rec in data.get("tenants", {}).items():
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
        data = self._load()
        tenants = data.setdefault("tenants", {})
        if any(fold(n) == fold(name) for n in tenants):
            raise AlreadyExists(f"tenant {name!r} exists")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        tenants[name] = {"key_sha256": [hash_key(key)], "admin": admin, "created_at": time.time()}
        self._write(data)
        return key

    def remove(self, name: str) -> None:
        data = self._load()
        if name not in data.get("tenants", {}):
            raise NotFound(f"tenant {name!r} not found")
        del data["tenants"][name]
        self._write(data)

    def _write(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, indent=2, sort_keys=True).encode())
        os.chmod(self.path, 0o600)
        self._stamp = None
