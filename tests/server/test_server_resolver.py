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


def test_a_versioned_name_finds_that_version_whatever_current_says(layout: Layout) -> None:
    store = LocalAdapterStore(layout)
    _fake_adapter(layout, "A", "x", version="v0002")
    current = find(store, "A/x", BASES)
    first = find(store, "A/x@v0001", BASES)
    second = find(store, "A/x@v0002", BASES)
    assert current is not None and first is not None and second is not None
    assert (current.version, first.version, second.version) == ("v0002", "v0001", "v0002")
    assert first.path == layout.version_dir("A", "x", "v0001")
    assert second.path == current.path == layout.version_dir("A", "x", "v0002")
    # vLLM loads each under the name asked for...
    assert [a.served_name for a in (current, first, second)] == ["A/x", "A/x@v0001", "A/x@v0002"]
    # ...and, since its engine keys adapters by id, each name gets its own, even where
    # two names serve the same folder.
    ids = {a.lora_int_id for a in (current, first, second)}
    assert len(ids) == 3
    assert current.lora_int_id == stable_lora_id("A", "x", "v0002")
    assert second.lora_int_id == stable_lora_id("A", "x", "v0002", explicit=True)
    # Rolling back (current -> v0001) changes what the plain name serves, not the others.
    write_atomic(layout.adapter_dir("A", "x") / CURRENT, b"v0001")
    rolled = find(store, "A/x", BASES)
    assert rolled is not None and rolled.version == "v0001"
    assert rolled.lora_int_id not in ids
    assert find(store, "A/x@v0002", BASES) == second


@pytest.mark.parametrize(
    "model",
    ["A/x@v0009", "A/x@", "A/x@x1", "A/x@v1@v2", "A/x@v0001@v0001", "A/x@v1", "B/x@v0001"],
)
def test_a_missing_or_malformed_version_finds_nothing(layout: Layout, model: str) -> None:
    assert find(LocalAdapterStore(layout), model, BASES) is None


def test_versions_of_an_unpublished_or_foreign_base_adapter_are_not_served(
    layout: Layout,
) -> None:
    store = LocalAdapterStore(layout)
    _fake_adapter(layout, "A", "x", version="v0002", base_model_name_or_path="other/base")
    assert find(store, "A/x@v0001", BASES) is not None
    assert find(store, "A/x@v0002", BASES) is None
    # Unpublished: the name stops resolving under every spelling, versions still held.
    store.unpublish("A", "x")
    assert layout.version_dir("A", "x", "v0001").is_dir()
    assert find(store, "A/x", BASES) is None
    assert find(store, "A/x@v0001", BASES) is None
    # Not listed either: the listing is one adapter per plain name.
    assert list_published(store, "A", BASES) == []


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
    ids = {(stable_lora_id("A", "x", "v0001"), stable_lora_id("A", "x", "v0001", explicit=True))}
    code = (
        "from server.adapters import stable_lora_id as i; "
        "print(i('A', 'x', 'v0001'), i('A', 'x', 'v0001', explicit=True))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        )
        plain, explicit = out.stdout.split()
        ids.add((int(plain), int(explicit)))
    assert len(ids) == 1
    values = [
        stable_lora_id("t", f"a{i}", f"v{v:04d}", explicit=explicit)
        for i in range(500)
        for v in (1, 2)
        for explicit in (False, True)
    ]
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
        pinned = asyncio.run(resolver.resolve_lora("/models/tiny", "A/x@v0001"))
        assert pinned is not None and pinned.lora_name == "A/x@v0001"
        assert pinned.lora_path == request.lora_path
        assert pinned.lora_int_id == stable_lora_id("A", "x", "v0001", explicit=True)
        assert pinned.lora_int_id != request.lora_int_id
        assert asyncio.run(resolver.resolve_lora("/models/tiny", "A/x@v0002")) is None
    finally:
        LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)
