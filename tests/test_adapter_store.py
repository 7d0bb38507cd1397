"""What any adapter store must do (``trainer.adapter_store.AdapterStore``), checked on each
implementation: the local volume today; object storage joins the list when it exists."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer.adapter_store import AdapterStore, LocalAdapterStore
from trainer.layout import Layout

STORES: dict[str, Callable[[Path], AdapterStore]] = {
    "local": lambda tmp: LocalAdapterStore(Layout(tmp / "data").create()),
}


def _adapter(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AdapterStore:
    return STORES[request.param](tmp_path)


def test_versions_are_whole_immutable_and_current_moves_last(
    store: AdapterStore, tmp_path: Path
) -> None:
    one = _adapter(tmp_path / "one", b"weights one")
    two = _adapter(tmp_path / "two", b"weights two")
    assert store.current("acme", "bot") is None and store.versions("acme", "bot") == []

    v1 = store.publish("acme", "bot", one, {"job_id": "job-1"})
    v2 = store.publish("acme", "bot", two, {"job_id": "job-2"})
    assert (v1, v2) == ("v0001", "v0002")
    assert store.current("acme", "bot") == v2 and store.versions("acme", "bot") == [v1, v2]
    assert store.names("acme") == ["bot"] and store.names("bolt") == []
    # Each version fetched whole, with its manifest, and the first unchanged by the second.
    for version, weights, job in ((v1, b"weights one", "job-1"), (v2, b"weights two", "job-2")):
        folder = store.fetch("acme", "bot", version)
        assert folder is not None
        assert (folder / "adapter_model.safetensors").read_bytes() == weights
        assert json.loads((folder / "manifest.json").read_text())["job_id"] == job
    # A job that published before (a restart mid-publish) gets its version, named current.
    assert store.publish("acme", "bot", one, {"job_id": "job-1"}) == v1
    assert store.current("acme", "bot") == v1 and store.versions("acme", "bot") == [v1, v2]


def test_unpublish_then_remove(store: AdapterStore, tmp_path: Path) -> None:
    version = store.publish("acme", "bot", _adapter(tmp_path / "a", b"w"), {"job_id": "job-1"})
    store.unpublish("acme", "bot")
    # The name no longer resolves; the bytes stay for whatever still serves them.
    assert store.current("acme", "bot") is None
    assert store.fetch("acme", "bot", version) is not None
    store.remove("acme", "bot")
    assert store.versions("acme", "bot") == [] and store.names("acme") == []
    assert store.fetch("acme", "bot", version) is None
    store.remove("acme", "bot")  # removing what is gone is not an error
