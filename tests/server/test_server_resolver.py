"""The resolver finds only valid, current, same-base adapters, under stable ids."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.adapters import find, list_published, stable_lora_id
from trainer.adapter_store import LocalAdapterStore
from trainer.layout import CURRENT, Layout, write_atomic

BASES = ["tiny", "/models/tiny"]


def _fake_adapter(layout: Layout, tenant: str, name: str, version: str = "v0001", **cfg) -> Path:
    """A version folder with just the files the resolver reads (vLLM is not involved)."""
    folder = layout.version_dir(tenant, name, version)
    folder.mkdir(parents=True)
    config = {"peft_type": "LORA", "base_model_name_or_path": "tiny", "r": 8, **cfg}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    write_atomic(layout.adapter_dir(tenant, name) / CURRENT, version.encode())
    return folder


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "data").create()
    _fake_adapter(layout, "A", "x")
    _fake_adapter(layout, "B", "y")
    return layout


def test_finds_the_current_version(layout: Layout) -> None:
    found = find(LocalAdapterStore(layout), "A/x", BASES)
    assert found is not None
    assert found.path == layout.version_dir("A", "x", "v0001")
    assert found.served_name == "A/x"
    # A new version becomes current by rewriting `current` only.
    _fake_adapter(layout, "A", "x", version="v0002")
    found2 = find(LocalAdapterStore(layout), "A/x", BASES)
    assert found2 is not None and found2.version == "v0002"
    assert found2.lora_int_id != found.lora_int_id


@pytest.mark.parametrize(
    "model",
    [
        "../A/x",
        "A/../B/y",
        "A/x/../../B/y",
        "A/x/",
        "/A/x",
        "A//x",
        "A/x/v0001",
        "A",
        "",
        "A/.x",
        "A/x\x00",
        "\uff21/x",  # a full-width look-alike of "A/x"
        "A/ x",
        "A/nonexistent",
    ],
)
def test_rejects_anything_but_two_valid_existing_parts(layout: Layout, model: str) -> None:
    assert find(LocalAdapterStore(layout), model, BASES) is None


def test_rejects_an_absolute_path(layout: Layout) -> None:
    path = layout.version_dir("B", "y", "v0001")
    assert path.is_dir()
    assert find(LocalAdapterStore(layout), str(path), BASES) is None
    assert find(LocalAdapterStore(layout), str(layout.adapter_dir("B", "y")), BASES) is None


def test_rejects_another_base_or_a_non_lora(layout: Layout) -> None:
    _fake_adapter(layout, "A", "other", base_model_name_or_path="some/other-model")
    _fake_adapter(layout, "A", "ia3", peft_type="IA3")
    assert find(LocalAdapterStore(layout), "A/other", BASES) is None
    assert find(LocalAdapterStore(layout), "A/ia3", BASES) is None
    # The --model path is accepted as well as the served name.
    _fake_adapter(layout, "A", "bypath", base_model_name_or_path="/models/tiny")
    assert find(LocalAdapterStore(layout), "A/bypath", BASES) is not None


def test_rejects_a_bad_current_and_a_symlink_out_of_the_volume(
    layout: Layout, tmp_path: Path
) -> None:
    write_atomic(layout.adapter_dir("A", "x") / CURRENT, b"../../B/y/v0001")
    assert find(LocalAdapterStore(layout), "A/x", BASES) is None
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "base_model_name_or_path": "tiny"})
    )
    layout.adapter_dir("A", "link").mkdir()
    os.symlink(outside, layout.version_dir("A", "link", "v0001"))
    write_atomic(layout.adapter_dir("A", "link") / CURRENT, b"v0001")
    assert find(LocalAdapterStore(layout), "A/link", BASES) is None


def test_lists_a_tenants_adapters_only(layout: Layout) -> None:
    _fake_adapter(layout, "A", "second")
    assert [a.served_name for a in list_published(LocalAdapterStore(layout), "A", BASES)] == [
        "A/second",
        "A/x",
    ]
    assert [a.served_name for a in list_published(LocalAdapterStore(layout), "B", BASES)] == ["B/y"]
    assert list_published(LocalAdapterStore(layout), "..", BASES) == []
    assert list_published(LocalAdapterStore(layout), "C", BASES) == []


def test_ids_are_stable_across_processes_and_positive() -> None:
    ids = {stable_lora_id("A", "x", "v0001")}
    code = "from server.adapters import stable_lora_id; print(stable_lora_id('A', 'x', 'v0001'))"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        ids.add(int(out.stdout))
    assert len(ids) == 1
    values = [stable_lora_id("t", f"a{i}", "v0001") for i in range(2000)]
    assert all(1 <= v < 2**31 for v in values)
    assert len(set(values)) == len(values)


def test_plugin_registers_only_with_a_data_dir(
    layout: Layout, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.lora.resolver import LoRAResolverRegistry

    from server.resolver import RESOLVER_NAME, register

    LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)
    monkeypatch.delenv("FINETUNE_DATA_DIR", raising=False)
    register()
    assert RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers()

    monkeypatch.setenv("FINETUNE_DATA_DIR", str(layout.root))
    monkeypatch.setenv("FINETUNE_BASE_MODEL", "tiny")
    monkeypatch.setenv("FINETUNE_MODEL_PATH", "/models/tiny")
    register()
    try:
        resolver = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
        # vLLM passes its --model as the base name.
        request = asyncio.run(resolver.resolve_lora("/models/tiny", "A/x"))
        assert request is not None
        assert request.lora_name == "A/x"
        assert request.lora_path == str(layout.version_dir("A", "x", "v0001"))
        assert request.lora_int_id == stable_lora_id("A", "x", "v0001")
        assert asyncio.run(resolver.resolve_lora("/models/tiny", "../B/y")) is None
        assert asyncio.run(resolver.resolve_lora("/models/tiny", "A/missing")) is None
    finally:
        LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)
