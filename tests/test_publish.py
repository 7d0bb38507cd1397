"""Publishing: vLLM's limits are enforced, versions are immutable, nothing half-written shows."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from trainer.adapter_store import LocalAdapterStore
from trainer.errors import InvalidArgument
from trainer.layout import Layout
from trainer.names import check_name
from trainer.service.publish import AdapterRejected, Publisher, check_adapter
from trainer.service.store import SqliteStore


def _save_adapter(base_dir: Path, out: Path, **lora_kwargs) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    cfg = LoraConfig(
        **{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **lora_kwargs}
    )
    get_peft_model(model, cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return _save_adapter(tiny_model_dir, tmp_path_factory.mktemp("a") / "adapter")


def _publisher(tmp_path: Path) -> tuple[Publisher, Layout]:
    layout = Layout(tmp_path / "data").create()
    return Publisher(LocalAdapterStore(layout), SqliteStore(layout.db), max_lora_rank=64), layout


def _manifest(pub: Publisher, job_id: str) -> dict:
    return pub.manifest(
        job_id=job_id,
        tenant="acme",
        adapter="bot",
        base_model="tiny",
        dataset_sha256="0" * 64,
        hyperparameters={},
        metrics={},
    )


def test_versions_are_new_folders_and_old_ones_stay(tmp_path, adapter):
    pub, layout = _publisher(tmp_path)
    v1 = asyncio.run(pub.publish("acme", "bot", adapter, _manifest(pub, "job-0000000000000001")))
    v1_bytes = {p.name: p.read_bytes() for p in layout.version_dir("acme", "bot", v1).iterdir()}
    v2 = asyncio.run(pub.publish("acme", "bot", adapter, _manifest(pub, "job-0000000000000002")))
    assert (v1, v2) == ("v0001", "v0002")
    assert layout.current_version("acme", "bot") == "v0002"
    after = {p.name: p.read_bytes() for p in layout.version_dir("acme", "bot", v1).iterdir()}
    assert after == v1_bytes
    assert (
        json.loads((layout.version_dir("acme", "bot", v2) / "manifest.json").read_text())["job_id"]
        == "job-0000000000000002"
    )
    assert list(layout.staging.iterdir()) == []  # nothing half-built left behind
    # Publishing the same job again (a restart mid-publish) reuses its version.
    again = asyncio.run(pub.publish("acme", "bot", adapter, _manifest(pub, "job-0000000000000002")))
    assert again == "v0002" and layout.versions("acme", "bot") == ["v0001", "v0002"]


def test_delete_unpublishes_then_removes(tmp_path, adapter):
    pub, layout = _publisher(tmp_path)
    asyncio.run(pub.publish("acme", "bot", adapter, _manifest(pub, "job-0000000000000001")))
    asyncio.run(pub.delete("acme", "bot"))
    assert layout.current_dir("acme", "bot") is None
    assert not layout.adapter_dir("acme", "bot").exists()
    assert pub.store.list_adapters("acme") == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"r": 12}, "rank 12"),
        ({"r": 128}, "rank 128"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["q_proj", "lm_head"]}, "target_modules"),
        ({"use_dora": True}, "DoRA"),
    ],
)
def test_adapters_vllm_would_refuse_are_rejected(tmp_path, tiny_model_dir, change, reason):
    kwargs = dict(change)
    if "r" in kwargs:
        kwargs["lora_alpha"] = 2 * kwargs["r"]
    out = _save_adapter(tiny_model_dir, tmp_path / "bad", **kwargs)
    with pytest.raises(AdapterRejected, match=reason):
        check_adapter(out, max_lora_rank=64)
    pub, layout = _publisher(tmp_path)
    with pytest.raises(AdapterRejected):
        asyncio.run(pub.publish("acme", "bot", out, _manifest(pub, "job-0000000000000001")))
    assert not layout.adapter_dir("acme", "bot").exists()


def test_missing_weights_are_rejected(tmp_path, adapter):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    with pytest.raises(AdapterRejected, match=r"adapter_model\.safetensors"):
        check_adapter(broken, 64)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        "../x",
        "a/b",
        "/abs",
        "a\x00b",
        "x" * 65,
        "-lead",
        ".hidden",
        "caf\u00e9",
        "\uff41dmin",
        "admin\u200b",
        "a b",
        "a..b",
    ],
)
def test_hostile_names_never_reach_a_path(tmp_path, name):
    with pytest.raises(InvalidArgument):
        check_name(name, "adapter_name")
    layout = Layout(tmp_path)
    with pytest.raises(InvalidArgument):
        layout.adapter_dir("acme", name)
    with pytest.raises(InvalidArgument):
        layout.adapter_dir(name, "bot")
