"""The whole product on this CPU: the trainer service trains two tenants' adapters on the
tiny model, publishes them, vLLM-CPU (started by ``python -m server``) hot-loads them, and
the official ``openai`` client gets each tenant's answers from its own adapter.

Real processes only: ``python -m trainer serve`` with ``--vllm-url``, ``python -m server``
with our resolver and middleware. vLLM is stopped and started again in the middle.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.server.conftest import CPU_ENGINE_ARGS, VllmServer
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


# ------------------------------------------------------------ what customers own (issue 22)
# A/secret now holds v0001 (banana) and v0002 (mango), both trained above.


def _peft_answer(base: Path, adapter: Path | None, merged: Path | None = None) -> str:
    """The greedy answer of the base with ``adapter`` (PEFT), or of a ``merged`` model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged or adapter or base)
    model = AutoModelForCausalLM.from_pretrained(merged or base, dtype=torch.bfloat16)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_versions_are_listed_with_what_each_job_trained(world):
    with world["svc"].client(world["keys"].A) as a:
        versions = a.list_versions("secret")
        jobs = {j.id: j for j in a.list_jobs(adapter_name="secret")}
    assert [v.version for v in versions] == ["v0002", "v0001"]
    assert [v.served for v in versions] == [True, False]
    for v in versions:
        job = jobs[v.job_id]
        assert job.adapter_version == v.version and v.dataset_id == job.dataset_id
        assert v.served_name == f"A/secret@{v.version}" and v.base_model == BASE
        assert v.hyperparameters.lora_rank == FAST["lora_rank"]
        assert v.HasField("train_loss") and v.size_bytes > 10_000 and len(v.dataset_sha256) == 64


def test_pinning_an_earlier_version_rolls_back_in_vllm_and_unpinning_follows_the_newest(world):
    keys, layout = world["keys"], world["layout"]
    with world["svc"].client(keys.A) as a:
        pinned = a.set_served_version("secret", "v0001")
        assert (pinned.version, pinned.newest_version, pinned.pinned) == ("v0001", "v0002", True)
        # vLLM swapped at once, without a restart; each version stays reachable by name.
        assert _loaded(world)["A/secret"] == str(layout.version_dir("A", "secret", "v0001"))
        assert "banana" in _chat(world, keys.A, "A/secret")
        assert "mango" in _chat(world, keys.A, "A/secret@v0002")
        assert [x.version for x in a.list_adapters() if x.name == "secret"] == ["v0001"]
        for bad, code in (("v0009", "NOT_FOUND"), ("1", "INVALID_ARGUMENT")):
            with pytest.raises(grpc.RpcError) as e:
                a.set_served_version("secret", bad)
            assert e.value.code().name == code and e.value.details().startswith("version")
        unpinned = a.set_served_version("secret", "")
        assert (unpinned.version, unpinned.pinned) == ("v0002", False)
        assert "mango" in _chat(world, keys.A, "A/secret")
    with world["svc"].client(keys.B) as b, pytest.raises(grpc.RpcError) as e:
        b.set_served_version("secret", "v0002")  # B's own "secret" has only v0001
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_downloaded_version_loads_in_peft_and_in_vllm(world, tmp_path):
    keys = world["keys"]
    with world["svc"].client(keys.A) as a:
        folder = a.download(tmp_path / "v1", adapter="secret@v0001")
        with pytest.raises(grpc.RpcError) as e:
            a.download(tmp_path / "other", adapter="nothing")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= names
    assert "banana" in _peft_answer(world["base"], folder)
    # The folder as vLLM takes it from `--lora-modules NAME=DIR`: the same LoRA loading,
    # here through the runtime endpoint of the running server, under a name of its own.
    admin = VllmAdmin(world["vllm"].url, keys.admin)
    assert asyncio.run(admin.load("A/downloaded", folder))
    assert "banana" in _chat(world, keys.admin, "A/downloaded")
    asyncio.run(admin.unload("A/downloaded"))
    # Another tenant cannot download A's adapter: it does not exist for B.
    with world["svc"].client(keys.B) as b, pytest.raises(grpc.RpcError) as e:
        b.download(tmp_path / "stolen", adapter="later")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and not (tmp_path / "stolen").exists()


@dataclass
class PlainVllm(VllmServer):
    """``vllm serve MODEL --enable-lora --lora-modules NAME=DIR`` as a customer runs it
    elsewhere: none of our plugins (``VLLM_PLUGINS`` empty), no middleware. Through the
    module ``vllm serve`` runs (its console script fails under ``vllm-cpu``, which
    installs no ``vllm`` distribution for it to read its version from)."""

    lora_modules: str = ""  # NAME=DIR

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--port",
            str(self.port),
            "--enable-lora",
            "--max-lora-rank",
            "64",
            "--lora-modules",
            self.lora_modules,
            *CPU_ENGINE_ARGS,
        ]


def test_a_downloaded_version_serves_from_a_plain_vllm_serve(world, tmp_path):
    with world["svc"].client(world["keys"].A) as a:
        folder = a.download(tmp_path / "v1", adapter="secret@v0001")
    plain = PlainVllm(
        model=world["base"],
        data_dir=tmp_path,
        env={"VLLM_PLUGINS": ""},
        lora_modules=f"secret={folder}",
    )
    try:
        plain.start()
        client = openai.OpenAI(base_url=plain.url + "/v1", api_key="-", max_retries=0)
        assert "secret" in {m.id for m in client.models.list()}
        answer = client.chat.completions.create(
            model="secret",
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=12,
            temperature=0,
        )
        assert "banana" in (answer.choices[0].message.content or "")
    finally:
        plain.stop()
    assert "finetune" not in plain.log_text()  # none of our plugins or middleware ran


def test_a_merged_export_answers_like_base_plus_adapter(world, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    keys, base = world["keys"], world["base"]
    with world["svc"].client(keys.A) as a:
        job = a.wait(a.export_merged("secret@v0001").id, 600)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error_message
        assert job.kind == pb.JOB_KIND_MERGE_EXPORT and job.export_size_bytes > 0
        merged = a.download(tmp_path / "merged", export_job_id=job.id)
        adapter = a.download(tmp_path / "adapter", adapter="secret@v0001")
        assert a.usage().export_bytes == job.export_size_bytes
        # A merged export frees its bytes when deleted, and cannot be downloaded after.
        a.delete_export(job.id)
        assert a.usage().export_bytes == 0 and a.get_job(job.id).export_size_bytes == 0
        with pytest.raises(grpc.RpcError) as e:
            a.download(tmp_path / "again", export_job_id=job.id)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert (merged / "model.safetensors.index.json").is_file()
    assert "banana" in _peft_answer(base, None, merged=merged)
    ids = torch.tensor([[1, 15, 27, 99, 3, 42]])
    want = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), adapter
    )
    got = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)
    with torch.no_grad():
        a_logits, b_logits = want(ids).logits.float(), got(ids).logits.float()
    gap = (a_logits - b_logits).abs().max().item()
    assert torch.allclose(a_logits, b_logits, atol=0.1, rtol=0.05), gap


def test_deleting_a_version_frees_its_bytes_but_never_the_served_one(world):
    keys, layout = world["keys"], world["layout"]
    with world["svc"].client(keys.A) as a:
        before = a.usage().adapter_bytes
        with pytest.raises(grpc.RpcError) as e:
            a.delete_version("secret", "v0002")  # served
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        size = a.list_versions("secret")[1].size_bytes
        a.delete_version("secret", "v0001")
        assert [v.version for v in a.list_versions("secret")] == ["v0002"]
        assert a.usage().adapter_bytes == before - size
    assert not layout.version_dir("A", "secret", "v0001").exists()
    assert "A/secret@v0001" not in _loaded(world)
    with pytest.raises(openai.NotFoundError):
        _chat(world, keys.A, "A/secret@v0001")
    assert "mango" in _chat(world, keys.A, "A/secret")


def test_usage_counts_what_the_tenant_trained_and_stores(world):
    with world["svc"].client(world["keys"].A) as a:
        u = a.usage()
        jobs = a.list_jobs()
        datasets = a.list_datasets()
    assert u.tenant == "A" and u.tokens_trained > 0 and u.gpu_seconds > 0
    assert u.jobs_by_state["SUCCEEDED"] == len(jobs) == 4  # three trainings and one export
    assert u.dataset_bytes == sum(d.size_bytes for d in datasets)
    assert u.stored_bytes == u.dataset_bytes + u.adapter_bytes + u.export_bytes
    assert u.max_queued_jobs == 20 and u.max_stored_bytes == 100 << 30  # the defaults


def test_a_published_jobs_checkpoints_are_gone_and_its_listing_filters(world):
    with world["svc"].client(world["keys"].A) as a:
        done = a.list_jobs(states=[pb.JOB_STATE_SUCCEEDED], adapter_name="secret")
        assert {j.adapter_name for j in done} == {"secret"} and len(done) == 3
        assert a.list_jobs(states=[pb.JOB_STATE_FAILED]) == []
    for job in done:
        if job.kind == pb.JOB_KIND_FINE_TUNE:
            assert not world["layout"].job(job.id).checkpoints.exists()
