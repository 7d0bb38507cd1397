"""The resolver finds only valid, current, same-base adapters, under stable ids."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from server.adapters import find, list_published, stable_lora_id
from trainer.adapter_store import LocalAdapterStore
from trainer.layout import CURRENT, Layout, write_atomic

if TYPE_CHECKING:
    from tests.radosgw import RadosGateway, S3Bucket

BASES = ["tiny", "/models/tiny"]

pytest_plugins = ("tests.radosgw",)  # a real S3 server, started only by the test that asks


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


def test_the_plugin_serves_an_adapter_published_into_s3(
    radosgw: RadosGateway, s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--adapter-store s3://...`` reaches the plugin through the launcher's environment;
    the plugin fetches the current version into the data directory's cache and hands vLLM
    that folder; storage down is a retryable 503, not "does not exist"."""
    from vllm.exceptions import RetryableRequestError
    from vllm.lora.resolver import LoRAResolverRegistry

    from server.adapters import CACHE_DIR
    from server.launcher import ServerConfig, build_env
    from server.resolver import RESOLVER_NAME, register

    gateway, bucket = radosgw, s3_bucket
    src = tmp_path / "trained"
    src.mkdir()
    config = {"peft_type": "LORA", "base_model_name_or_path": "tiny", "r": 8}
    (src / "adapter_config.json").write_text(json.dumps(config))
    (src / "adapter_model.safetensors").write_bytes(b"weights" * 1000)
    publisher = bucket.store(tmp_path / "trainer-cache", prefix="adapters")
    publisher.publish("A", "x", src, {"job_id": "job-1"})
    publisher.publish("A", "x", src, {"job_id": "job-2"})

    data = Layout(tmp_path / "serving-data").create()  # another host's: no adapters on it
    cfg = ServerConfig(model="/models/tiny", data_dir=data.root, served_model_name="tiny",
                       adapter_store=f"s3://{bucket.bucket}/adapters")  # fmt: skip
    for name, value in build_env(cfg, bucket.env()).items():
        if name.startswith(("FINETUNE_", "AWS_")):
            monkeypatch.setenv(name, value)
    LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)
    register()
    try:
        resolver = LoRAResolverRegistry.get_resolver(RESOLVER_NAME)
        lora = asyncio.run(resolver.resolve_lora("/models/tiny", "A/x"))
        cached = data.root / CACHE_DIR / "A" / "x" / "v0002"
        assert lora is not None and lora.lora_name == "A/x"
        assert lora.lora_path == str(cached)
        assert lora.lora_int_id == stable_lora_id("A", "x", "v0002")
        assert (cached / "adapter_model.safetensors").read_bytes() == b"weights" * 1000
        assert json.loads((cached / "adapter_config.json").read_text()) == config
        old = asyncio.run(resolver.resolve_lora("/models/tiny", "A/x@v0001"))
        assert old is not None and old.lora_path == str(cached.with_name("v0001"))
        for missing in ("A/y", "B/x", "A/x@v0003", "../A/x"):
            assert asyncio.run(resolver.resolve_lora("/models/tiny", missing)) is None
        gateway.stop_gateway()
        try:
            with pytest.raises(RetryableRequestError, match="retry later") as down:
                asyncio.run(resolver.resolve_lora("/models/tiny", "A/x"))
            assert bucket.endpoint not in str(down.value)  # the reason is logged, not shown
        finally:
            gateway.start_gateway()
        again = asyncio.run(resolver.resolve_lora("/models/tiny", "A/x"))
        assert again is not None and again.lora_path == lora.lora_path
    finally:
        LoRAResolverRegistry.resolvers.pop(RESOLVER_NAME, None)
