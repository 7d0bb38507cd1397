"""Tenant isolation for vLLM's OpenAI server: ``--middleware server.middleware.TenantMiddleware``.

A pure ASGI middleware (vLLM adds a class with ``app.add_middleware``), outermost of
vLLM's own, so every request meets it before any route:

* ``Authorization: Bearer <key>`` with the trainer's keys (``trainer.tenants``; the file
  is re-read when its stat changes). No key or an unknown key: 401.
* Deny by default. Admin keys reach every route. Tenant keys reach only the routes in
  ``TENANT_ROUTES``; everything else (runtime LoRA loading, ``/adapters``,
  ``/invocations``, ``/metrics``, ``/v1/responses``, ...) answers 403. ``PUBLIC_ROUTES``
  (health checks) need no key.
* On the inference routes a tenant may name the base model or its own
  ``<tenant>/<adapter>``, or one version of it, ``<tenant>/<adapter>@v0002``. Any other
  ``model`` gets the 404 vLLM gives for a missing model; vLLM's own 404s on these routes
  are replaced by the same body, so another tenant's adapter (any version of it) and a
  nonexistent one answer byte for byte alike. A versioned name is checked against the
  volume on every request, so a version deleted (or an adapter unpublished) while vLLM
  still holds it loaded is not served on.
* Each tenant's prompts get their own prefix-cache salt, so one tenant cannot time
  another's cached prompts on the shared base model.
* ``GET /v1/models`` shows a tenant the base and its own adapters only (loaded ones and
  those published on the volume), without server paths; one card per adapter, not one
  per version.

Settings come from the environment the launcher sets (``server.ENV_*``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from server import (
    ENV_BASE_MODEL,
    ENV_DATA_DIR,
    ENV_MODEL_PATH,
    ENV_TENANTS_FILE,
    ENV_TENANTS_STORE,
)
from server.adapters import find, list_published, open_store
from trainer.errors import Unavailable
from trainer.layout import Layout
from trainer.names import ServedName, parse_served_name
from trainer.tenants import Tenant, tenant_registry

# Under "vllm.": these run inside vLLM, whose logging setup then shows our lines too.
log = logging.getLogger("vllm.finetune.middleware")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Health checks of the orchestrator: no key needed, nothing to leak.
PUBLIC_ROUTES: frozenset[tuple[str, str]] = frozenset({("GET", "/health"), ("GET", "/ping")})

# Routes whose JSON body names a ``model`` that must be the base or the caller's own.
MODEL_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
    }
)
# Of those, the ones that generate and so share the prefix cache.
SALTED_ROUTES: frozenset[tuple[str, str]] = frozenset(
    {("POST", "/v1/chat/completions"), ("POST", "/v1/completions")}
)
MODELS_ROUTE = ("GET", "/v1/models")

# The whole tenant allow-list. Anything not here is for admin keys only.
TENANT_ROUTES: frozenset[tuple[str, str]] = MODEL_ROUTES | {MODELS_ROUTE}

DEFAULT_MAX_BODY_BYTES = 32 << 20
_JSON = [(b"content-type", b"application/json")]


def error_body(message: str, err_type: str, code: int, param: str | None = None) -> bytes:
    """An OpenAI-style error, serialised as vLLM's JSONResponse does."""
    err = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return json.dumps(err, ensure_ascii=False, separators=(",", ":")).encode()


def route_path(scope: Scope) -> str:
    """The path routes match on (Starlette's ``get_route_path``: ``root_path`` removed)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


def bearer_key(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            return key.strip() if scheme.lower() == "bearer" else ""
    return ""


async def storage_down(send: Send, error: Unavailable, what: str = "adapter") -> None:
    """503 for an adapter (or tenant) store that did not answer (object storage down): the
    client may retry, unlike a 404 or a 401. The reason names the storage's endpoint, so it
    goes to the log."""
    log.error("%s storage did not answer: %s", what, error)
    msg = f"{what.capitalize()} storage did not answer; retry later."
    body = error_body(msg, "ServiceUnavailableError", 503)
    await send_json(send, 503, body, [(b"retry-after", b"5")])


async def send_json(send: Send, status: int, body: bytes, extra: list | None = None) -> None:
    headers = [*_JSON, (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def describe_routes(app: Any) -> list[dict[str, Any]]:
    """Every route mounted on ``app`` with who may call it, for the startup log and tests."""
    rows = []
    for route in getattr(app, "routes", []):
        path = getattr(route, "path", None)
        if path is None:
            continue
        kind = type(route).__name__
        if kind == "Mount":
            methods, path = ["*"], path + "/{path:path}"
        elif kind == "WebSocketRoute" or kind == "APIWebSocketRoute":
            methods = ["WEBSOCKET"]
        else:
            methods = sorted(getattr(route, "methods", None) or ["*"])
        for method in methods:
            if (method, path) in PUBLIC_ROUTES:
                access = "public"
            elif (method, path) in TENANT_ROUTES:
                access = "tenant"
            else:
                access = "admin"
            rows.append({"method": method, "path": path, "kind": kind, "access": access})
    return rows


class TenantMiddleware:
    """Tenant authentication and isolation in front of vLLM's routes."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tenants_file: str | Path | None = None,
        base_model: str | None = None,
        data_dir: str | Path | None = None,
        model_path: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self.app = app
        data_dir = data_dir or os.environ.get(ENV_DATA_DIR) or None
        tenants_file = tenants_file or os.environ.get(ENV_TENANTS_FILE) or None
        if tenants_file is None and data_dir is not None:
            tenants_file = Layout(Path(data_dir)).tenants_file
        if tenants_file is None:
            # Fail closed: without a tenants file no key could be checked.
            raise RuntimeError(f"TenantMiddleware needs {ENV_TENANTS_FILE} or {ENV_DATA_DIR}")
        self.model_path = model_path or os.environ.get(ENV_MODEL_PATH) or None
        base = base_model or os.environ.get(ENV_BASE_MODEL) or self.model_path
        if not base:
            raise RuntimeError(f"TenantMiddleware needs {ENV_BASE_MODEL}")
        self.base_model: str = base
        store = os.environ.get(ENV_TENANTS_STORE, "")
        self.registry = tenant_registry(Path(tenants_file), store)
        self.adapters = open_store(Path(data_dir)) if data_dir else None
        self.max_body_bytes = max_body_bytes
        self._described = False

    # ------------------------------------------------------------------ entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        else:
            if kind == "lifespan" and not self._described:
                self._described = True
                self._log_routes(scope.get("app"))
            await self.app(scope, receive, send)

    def _log_routes(self, app: Any) -> None:
        rows = describe_routes(app)
        log.info("finetune route policy: %s", json.dumps(rows, separators=(",", ":")))

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            tenant = self.registry.authenticate(bearer_key(scope))
        except Unavailable:  # the tenants' storage: refused like a bad key, closed
            tenant = None
        if tenant is not None and tenant.admin:
            await self.app(scope, receive, send)
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (scope["method"], route_path(scope))
        if route in PUBLIC_ROUTES:
            await self.app(scope, receive, send)
            return
        try:
            tenant = self.registry.authenticate(bearer_key(scope))
        except Unavailable as e:  # the tenants are in storage that never answered yet
            await storage_down(send, e, "tenant")
            return
        if tenant is None:
            body = error_body("Missing or invalid API key.", "AuthenticationError", 401)
            await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
            return
        if tenant.admin:
            await self.app(scope, receive, send)
            return
        if route not in TENANT_ROUTES:
            body = error_body("This route is not open to tenant keys.", "PermissionDenied", 403)
            await send_json(send, 403, body)
            return
        if route == MODELS_ROUTE:
            await self._list_models(tenant, scope, receive, send)
        else:
            await self._inference(tenant, route in SALTED_ROUTES, scope, receive, send)

    # ------------------------------------------------------------- inference
    def not_found(self, model: str) -> bytes:
        """vLLM's answer for a model it does not serve; it names the base only."""
        message = f"The model `{model}` does not exist. Valid aliases: {self.base_model}."
        return error_body(message, "NotFoundError", 404, "model")

    def may_use(self, tenant: Tenant, model: str) -> bool:
        """The base, or a name of the tenant's own: ``own/adapter`` or ``own/adapter@v0002``."""
        if model == "" or model == self.base_model:  # vLLM serves "" as the base
            return True
        name = parse_served_name(model)
        return name is not None and name.tenant == tenant.name

    def version_held(self, name: ServedName) -> bool:
        """Whether the volume still serves a versioned name.

        The trainer unloads an adapter from vLLM by its plain name only; a version vLLM
        loaded under ``<tenant>/<adapter>@<version>`` stays loaded (and in its CPU cache)
        after that version is deleted or the adapter unpublished. Asking the volume each
        time keeps such a name from answering on. Plain names need no such check.
        """
        if self.adapters is None:
            return True  # no volume to ask; vLLM's resolver decides alone
        bases = [self.base_model, self.model_path or ""]
        return find(self.adapters, str(name), bases) is not None

    async def _read_body(self, receive: Receive) -> bytes | int:
        """The whole body, or the status to answer instead (0: the client went away)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 0
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return 413
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _inference(
        self, tenant: Tenant, salted: bool, scope: Scope, receive: Receive, send: Send
    ) -> None:
        body = await self._read_body(receive)
        if isinstance(body, int):
            if body:
                msg = f"The body is larger than {self.max_body_bytes} bytes."
                await send_json(send, body, error_body(msg, "RequestTooLarge", body))
            return
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            await send_json(
                send, 400, error_body("The body must be a JSON object.", "BadRequestError", 400)
            )
            return
        model = data.get("model")
        if model is None:
            model = ""
        if not isinstance(model, str):
            msg = "'model' must be a string."
            await send_json(send, 400, error_body(msg, "BadRequestError", 400, "model"))
            return
        if not self.may_use(tenant, model):
            await send_json(send, 404, self.not_found(model))
            return
        name = parse_served_name(model)
        if name and name.version:
            try:  # a few stats and one small read (or object storage's): off the event loop
                held = await asyncio.to_thread(self.version_held, name)
            except Unavailable as e:
                await storage_down(send, e)
                return
            if not held:
                await send_json(send, 404, self.not_found(model))
                return
        if salted:
            body = self._salt(tenant, data, scope)

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect

        hiding = False

        async def guard(message: Message) -> None:
            # A 404 on these routes is always "no such model": answer it in our one shape.
            nonlocal hiding
            if message["type"] == "http.response.start" and message["status"] == 404:
                hiding = True
                return
            if hiding:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    await send_json(send, 404, self.not_found(model))
                return
            await send(message)

        await self.app(scope, replay, guard)

    def _salt(self, tenant: Tenant, data: dict[str, Any], scope: Scope) -> bytes:
        """Give the tenant its own prefix-cache namespace (vLLM's ``cache_salt``)."""
        salt = f"tenant-{tenant.name}"
        given = data.get("cache_salt")
        if isinstance(given, str) and given:
            salt += "." + hashlib.sha256(given.encode()).hexdigest()[:32]
        data["cache_salt"] = salt
        body = json.dumps(data, separators=(",", ":")).encode()
        scope["headers"] = [
            (k, str(len(body)).encode() if k == b"content-length" else v)
            for k, v in scope.get("headers", ())
        ]
        return body

    # ---------------------------------------------------------------- models
    async def _list_models(
        self, tenant: Tenant, scope: Scope, receive: Receive, send: Send
    ) -> None:
        start: Message | None = None
        chunks: list[bytes] = []

        async def collect(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await self._send_models(tenant, start, b"".join(chunks), send)

        await self.app(scope, receive, collect)

    async def _send_models(
        self, tenant: Tenant, start: Message | None, body: bytes, send: Send
    ) -> None:
        try:
            listing = json.loads(body) if start and start["status"] == 200 else None
        except ValueError:
            listing = None
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            msg = "The model list is unavailable."
            await send_json(send, 503, error_body(msg, "ServiceUnavailableError", 503))
            return
        # The volume listing reads a few small files (or object storage's): off the event loop.
        try:
            listing["data"] = await asyncio.to_thread(self.visible_models, tenant, listing["data"])
        except Unavailable as e:
            await storage_down(send, e)
            return
        await send_json(send, 200, json.dumps(listing, separators=(",", ":")).encode())

    def visible_models(self, tenant: Tenant, cards: list[Any]) -> list[dict[str, Any]]:
        """The base and the tenant's adapters, loaded or published; server paths removed.

        Versioned names (``A/x@v0001``) are not listed even when vLLM has one loaded: the
        list shows each adapter once, under the name that serves its current version,
        whatever versions someone happened to ask for; versions are listed with their
        manifests by the trainer's API, and any of them can be named without being listed.
        """
        shown: dict[str, dict[str, Any]] = {}
        for card in cards:
            if not isinstance(card, dict) or not isinstance(card.get("id"), str):
                continue
            card_id = card["id"]
            name = parse_served_name(card_id)
            if card_id == self.base_model or (
                name is not None and name.version is None and name.tenant == tenant.name
            ):
                shown[card_id] = {**card, "root": card_id}
        if self.adapters is not None:
            bases = [self.base_model, self.model_path or ""]
            for found in list_published(self.adapters, tenant.name, bases):
                shown.setdefault(
                    found.served_name,
                    {
                        "id": found.served_name,
                        "object": "model",
                        "created": int(_mtime(found.path)),
                        "owned_by": "vllm",
                        "root": found.served_name,
                        "parent": self.base_model,
                        "max_model_len": None,
                        "permission": [],
                    },
                )
        return list(shown.values())


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
