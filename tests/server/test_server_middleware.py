"""The tenant middleware on a small real ASGI app shaped like vLLM's routes (no vLLM, fast)."""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from server.adapters import ENV_ADAPTER_STORE
from server.middleware import TENANT_ROUTES, TenantMiddleware, describe_routes
from trainer.layout import CURRENT, Layout, write_atomic
from trainer.tenants import TenantRegistry

if TYPE_CHECKING:
    from tests.radosgw import RadosGateway, S3Bucket

pytest_plugins = ("tests.radosgw",)  # a real S3 server, started only by the test that asks

# Versioned names as vLLM lists them once someone asked for them (A/x@v0001).
LOADED = ["A/x", "B/y", "unnamed-by-admin", "A/x@v0001", "B/y@v0001"]


async def _generate(request: Request) -> JSONResponse:
    raw = await request.body()
    model = json.loads(raw).get("model") or "tiny"
    if model != "tiny" and model not in LOADED:
        # A vLLM whose error text lists every loaded adapter: must never reach a tenant.
        msg = f"The model `{model}` does not exist. Valid aliases: tiny, {', '.join(LOADED)}."
        body = {"error": {"message": msg, "type": "NotFoundError", "param": "model", "code": 404}}
        return JSONResponse(body, status_code=404)
    return JSONResponse({"model": model, "echo": raw.decode()})


async def _models(request: Request) -> JSONResponse:
    cards = [{"id": "tiny", "object": "model", "root": "/srv/models/tiny", "parent": None}]
    cards += [{"id": n, "object": "model", "root": f"/data/{n}", "parent": "tiny"} for n in LOADED]
    return JSONResponse({"object": "list", "data": cards})


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _app(layout: Layout, **kwargs) -> Starlette:
    routes = [
        Route(path, _generate, methods=["POST"])
        for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")
    ]
    routes += [
        Route("/v1/models", _models, methods=["GET"]),
        Route("/health", _ok, methods=["GET"]),
        Route("/v1/load_lora_adapter", _ok, methods=["POST"]),
        Route("/v1/responses/{rid}", _ok, methods=["GET"]),
        Mount("/metrics", app=PlainTextResponse("secret metrics")),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(
        TenantMiddleware,
        tenants_file=layout.tenants_file,
        base_model="tiny",
        data_dir=layout.root,
        model_path="/srv/models/tiny",
        **kwargs,
    )
    return app


@pytest.fixture
def setup(tmp_path: Path):
    layout = Layout(tmp_path / "data").create()
    reg = TenantRegistry(layout.tenants_file)
    keys = {"A": reg.add("A"), "B": reg.add("B"), "admin": reg.add("ops", admin=True)}
    return layout, reg, keys


def _client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def run(coro):
    return asyncio.run(coro)


def test_keys_are_required_except_for_health(setup) -> None:
    layout, _, keys = setup

    async def go():
        async with _client(_app(layout)) as c:
            assert (await c.get("/health")).status_code == 200
            for headers in ({}, _auth("ft-wrong"), {"Authorization": f"Basic {keys['A']}"}):
                r = await c.post("/v1/completions", json={"model": "tiny"}, headers=headers)
                assert r.status_code == 401
                assert r.json()["error"]["type"] == "AuthenticationError"
                assert r.headers["www-authenticate"] == "Bearer"
            r = await c.post("/v1/completions", json={"model": "tiny"}, headers=_auth(keys["A"]))
            assert r.status_code == 200

    run(go())


def test_tenants_reach_only_the_allow_list(setup) -> None:
    layout, _, keys = setup

    async def go():
        async with _client(_app(layout)) as c:
            for method, path in [
                ("POST", "/v1/load_lora_adapter"),
                ("GET", "/metrics"),
                ("GET", "/metrics/"),
                ("GET", "/v1/responses/abc"),
                ("GET", "/v1/chat/completions"),  # allowed path, other method
                ("HEAD", "/v1/models"),
                ("OPTIONS", "/v1/completions"),
                ("GET", "/no/such/route"),
            ]:
                r = await c.request(method, path, headers=_auth(keys["A"]))
                assert r.status_code == 403, (method, path)
                if method != "HEAD":
                    assert r.json()["error"]["type"] == "PermissionDenied"
                r = await c.request(method, path)
                assert r.status_code == 401, (method, path)
            r = await c.get("/metrics/", headers=_auth(keys["admin"]))
            assert r.status_code == 200 and r.text == "secret metrics"

    run(go())


def test_body_is_replayed_and_salted_per_tenant(setup) -> None:
    layout, _, keys = setup
    body = {"model": "A/x", "prompt": "hé" * 5000, "max_tokens": 3, "temperature": 0.0}

    async def go():
        async with _client(_app(layout)) as c:
            r = await c.post("/v1/completions", json=body, headers=_auth(keys["A"]))
            assert r.status_code == 200
            echoed = json.loads(r.json()["echo"])
            assert {k: v for k, v in echoed.items() if k != "cache_salt"} == body
            assert echoed["cache_salt"] == "tenant-A"
            # A salt the tenant picks stays inside its own namespace.
            r = await c.post(
                "/v1/completions", json={**body, "cache_salt": "tenant-B"}, headers=_auth(keys["A"])
            )
            assert json.loads(r.json()["echo"])["cache_salt"].startswith("tenant-A.")
            # tokenize is not generation: its body passes byte for byte.
            raw = json.dumps({"model": "A/x", "prompt": "x"}).encode()
            r = await c.post(
                "/tokenize",
                content=raw,
                headers={**_auth(keys["A"]), "content-type": "application/json"},
            )
            assert r.json()["echo"].encode() == raw

    run(go())


def test_other_tenants_adapter_is_exactly_like_a_missing_one(setup) -> None:
    layout, _, keys = setup

    async def go():
        async with _client(_app(layout)) as c:
            h = _auth(keys["A"])
            other = await c.post("/v1/chat/completions", json={"model": "B/y"}, headers=h)
            missing = await c.post("/v1/chat/completions", json={"model": "A/z"}, headers=h)
            by_admin = await c.post(
                "/v1/completions", json={"model": "unnamed-by-admin"}, headers=h
            )
            assert other.status_code == missing.status_code == by_admin.status_code == 404
            assert other.content.replace(b"B/y", b"A/z") == missing.content
            assert dict(other.headers) == dict(missing.headers)
            assert missing.json() == {
                "error": {
                    "message": "The model `A/z` does not exist. Valid aliases: tiny.",
                    "type": "NotFoundError",
                    "param": "model",
                    "code": 404,
                }
            }
            for r in (other, missing, by_admin):
                assert b"B/y" not in r.content.replace(b"`B/y`", b"")
                assert b"unnamed-by-admin" not in r.content.replace(b"`unnamed-by-admin`", b"")
            # The admin is not filtered.
            r = await c.post("/v1/completions", json={"model": "B/y"}, headers=_auth(keys["admin"]))
            assert r.status_code == 200

    run(go())


def test_bad_bodies_are_refused_before_the_app(setup) -> None:
    layout, _, keys = setup

    async def go():
        async with _client(_app(layout, max_body_bytes=1000)) as c:
            h = {**_auth(keys["A"]), "content-type": "application/json"}
            for content in (b"not json", b"[1, 2]", b'"tiny"', b""):
                r = await c.post("/v1/completions", content=content, headers=h)
                assert r.status_code == 400, content[:20]
            r = await c.post("/v1/completions", content=b" " * 2000, headers=h)
            assert r.status_code == 413
            r = await c.post("/v1/completions", json={"model": ["B/y"]}, headers=h)
            assert r.status_code == 400 and r.json()["error"]["param"] == "model"
            # No model, or "", is the base to vLLM.
            for body in ({}, {"model": None}, {"model": ""}):
                assert (await c.post("/v1/completions", json=body, headers=h)).status_code == 200

    run(go())


def test_models_lists_base_and_own_adapters_without_paths(setup) -> None:
    layout, _, keys = setup
    # A/pub is published on the volume but not loaded; B/hidden belongs to B.
    for tenant, name in (("A", "pub"), ("B", "hidden")):
        folder = layout.version_dir(tenant, name, "v0001")
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "base_model_name_or_path": "tiny"})
        )
        write_atomic(layout.adapter_dir(tenant, name) / CURRENT, b"v0001")

    async def go():
        async with _client(_app(layout)) as c:
            seen = {}
            for who in ("A", "B", "admin"):
                r = await c.get("/v1/models", headers=_auth(keys[who]))
                assert r.status_code == 200
                seen[who] = r.json()["data"]
            # One card per adapter: a loaded A/x@v0001 is not listed.
            assert [m["id"] for m in seen["A"]] == ["tiny", "A/x", "A/pub"]
            assert [m["id"] for m in seen["B"]] == ["tiny", "B/y", "B/hidden"]
            assert all(m["root"] == m["id"] for m in seen["A"] + seen["B"])
            assert [m["id"] for m in seen["admin"]] == ["tiny", *LOADED]

    run(go())


def _publish_fake(layout: Layout, tenant: str, name: str, version: str) -> Path:
    folder = layout.version_dir(tenant, name, version)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "tiny"})
    )
    write_atomic(layout.adapter_dir(tenant, name) / CURRENT, version.encode())
    return folder


def test_versioned_names_are_own_names_checked_against_the_volume(setup) -> None:
    layout, _, keys = setup

    async def go():
        async with _client(_app(layout)) as c:

            async def ask(who: str, model: str) -> httpx.Response:
                body = {"model": model, "prompt": "x"}
                return await c.post("/v1/completions", json=body, headers=_auth(keys[who]))

            # vLLM holds A/x@v0001 loaded, but the volume has no A/x: not served on.
            gone = await ask("A", "A/x@v0001")
            assert gone.status_code == 404
            v1 = _publish_fake(layout, "A", "x", "v0001")
            r = await ask("A", "A/x@v0001")
            assert r.status_code == 200 and r.json()["model"] == "A/x@v0001"
            assert json.loads(r.json()["echo"])["cache_salt"] == "tenant-A"
            # Another tenant's version answers exactly like a missing one.
            _publish_fake(layout, "B", "y", "v0001")
            other = await ask("A", "B/y@v0001")
            missing = await ask("A", "A/x@v0009")
            assert other.status_code == missing.status_code == 404
            assert other.content.replace(b"B/y@v0001", b"A/x@v0009") == missing.content
            assert gone.content.replace(b"A/x@v0001", b"A/x@v0009") == missing.content
            # B uses its own, and the admin anything, unchecked.
            assert (await ask("B", "B/y@v0001")).status_code == 200
            assert (await ask("admin", "B/y@v0001")).status_code == 200
            # Malformed: the same 404, before the app.
            for bad in ("A/x@", "A/x@x1", "A/x@v1@v2", "A/x@v0001@v0001"):
                r = await ask("A", bad)
                assert r.status_code == 404, bad
                assert r.content == missing.content.replace(b"A/x@v0009", bad.encode())
            # A newer current leaves v0001 addressable; deleting v0001's folder ends it
            # even though vLLM (here: the fake app) still has it loaded.
            _publish_fake(layout, "A", "x", "v0002")
            assert (await ask("A", "A/x@v0001")).status_code == 200
            shutil.rmtree(v1)
            assert (await ask("A", "A/x@v0001")).status_code == 404
            assert (await ask("A", "A/x")).status_code == 200

    run(go())


def test_adapter_storage_down_is_a_retryable_503(
    radosgw: RadosGateway,
    s3_bucket: S3Bucket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With adapters in object storage the model list and a versioned name ask it; while
    it is down both answer 503 (retry), not 404 (gone) or 500, with no endpoint in the
    body; back up, both answer again without a restart."""
    layout = Layout(tmp_path / "data").create()
    key = TenantRegistry(layout.tenants_file).add("A")
    env = {ENV_ADAPTER_STORE: f"s3://{s3_bucket.bucket}/adapters", **s3_bucket.env()}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    src = tmp_path / "trained"
    src.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "tiny"}
    (src / "adapter_config.json").write_text(json.dumps(config))
    s3_bucket.store(tmp_path / "trainer-cache", prefix="adapters").publish(
        "A", "x", src, {"job_id": "job-1"}
    )

    async def go():
        async with _client(_app(layout)) as c:

            async def both() -> list[httpx.Response]:
                body = {"model": "A/x@v0001", "prompt": "x"}
                return [
                    await c.get("/v1/models", headers=_auth(key)),
                    await c.post("/v1/completions", json=body, headers=_auth(key)),
                ]

            models, version = await both()
            assert models.status_code == 200 and version.status_code == 200
            assert "A/x" in {card["id"] for card in models.json()["data"]}
            radosgw.stop_gateway()
            try:
                for r in await both():
                    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
                    assert r.json()["error"]["type"] == "ServiceUnavailableError"
                    assert s3_bucket.endpoint not in r.text and "adapters" not in r.text
            finally:
                radosgw.start_gateway()
            assert [r.status_code for r in await both()] == [200, 200]

    run(go())


def test_tenants_file_changes_take_effect_without_restart(setup) -> None:
    layout, reg, keys = setup

    async def go():
        async with _client(_app(layout)) as c:
            h = _auth(keys["B"])
            assert (await c.get("/v1/models", headers=h)).status_code == 200
            reg.remove("B")
            assert (await c.get("/v1/models", headers=h)).status_code == 401
            new = reg.add("C")
            assert (await c.get("/v1/models", headers=_auth(new))).status_code == 200

    run(go())


def test_route_table_marks_only_the_allow_list_open(setup) -> None:
    layout, _, _ = setup
    rows = describe_routes(_app(layout))
    access = {(r["method"], r["path"]): r["access"] for r in rows}
    assert access[("GET", "/health")] == "public"
    assert access[("*", "/metrics/{path:path}")] == "admin"
    assert access[("POST", "/v1/load_lora_adapter")] == "admin"
    assert {k for k, v in access.items() if v == "tenant"} == set(TENANT_ROUTES)


def test_added_latency_is_well_under_a_millisecond(setup) -> None:
    """p50 of (app behind the middleware) - (bare app), called as ASGI, no network."""
    layout, _, keys = setup

    async def inner(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    wrapped = TenantMiddleware(
        inner, tenants_file=layout.tenants_file, base_model="tiny", data_dir=layout.root
    )
    body = json.dumps(
        {
            "model": "A/x",
            "messages": [{"role": "user", "content": "What is the secret word? " * 40}],
            "max_tokens": 64,
            "temperature": 0,
        }
    ).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "root_path": "",
        "headers": [
            (b"authorization", f"Bearer {keys['A']}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }

    async def call(app) -> float:
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            return None

        t0 = time.perf_counter()
        await app(dict(scope), receive, send)
        return time.perf_counter() - t0

    async def go():
        for _ in range(200):  # warm up
            await call(wrapped)
        bare = [await call(inner) for _ in range(2000)]
        behind = [await call(wrapped) for _ in range(2000)]
        return statistics.median(behind) - statistics.median(bare)

    added = run(go())
    print(f"added p50: {added * 1e6:.1f} us")
    assert added < 0.5e-3, f"middleware adds {added * 1e6:.0f} us at p50"


def test_websockets_are_for_the_admin_only(setup) -> None:
    layout, _, keys = setup
    reached = []

    async def inner(scope, receive, send):
        reached.append(scope["path"])
        await send({"type": "websocket.accept"})

    mw = TenantMiddleware(inner, tenants_file=layout.tenants_file, base_model="tiny")

    async def connect(key: str | None) -> list[dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            sent.append(message)

        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        await mw({"type": "websocket", "path": "/v1/realtime", "headers": headers}, receive, send)
        return sent

    for key in (None, keys["A"], "ft-wrong"):
        assert run(connect(key)) == [{"type": "websocket.close", "code": 1008}]
    assert reached == []
    assert run(connect(keys["admin"])) == [{"type": "websocket.accept"}]
    assert reached == ["/v1/realtime"]
