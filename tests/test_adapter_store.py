"""What any adapter store must do (``trainer.adapter_store.AdapterStore``), checked on each
implementation: the local volume, and object storage (``trainer.object_store``) on a real
S3 server (Ceph's radosgw, ``tests.radosgw``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from trainer.adapter_store import AdapterStore, LocalAdapterStore
from trainer.errors import FailedPrecondition, NotFound
from trainer.layout import Layout

pytest_plugins = ("tests.radosgw",)


def _s3_store(request: pytest.FixtureRequest, tmp: Path) -> AdapterStore:
    bucket = request.getfixturevalue("s3_bucket")  # only for the s3 cases: local needs no Ceph
    return bucket.store(tmp / "cache")


STORES: dict[str, Callable[[pytest.FixtureRequest, Path], AdapterStore]] = {
    "local": lambda request, tmp: LocalAdapterStore(Layout(tmp / "data").create()),
    "s3": _s3_store,
}


def _adapter(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> AdapterStore:
    return STORES[request.param](request, tmp_path)


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


def test_a_pinned_version_stays_current_through_later_publishes(
    store: AdapterStore, tmp_path: Path
) -> None:
    for i in (1, 2):
        store.publish("acme", "bot", _adapter(tmp_path / f"w{i}", b"w%d" % i), {"job_id": f"j{i}"})
    assert store.pin("acme", "bot", "v0001") == "v0001"
    assert store.current("acme", "bot") == "v0001" and store.pinned("acme", "bot") == "v0001"
    # Published while pinned: held (and fetchable by version) but not current.
    v3 = store.publish("acme", "bot", _adapter(tmp_path / "w3", b"w3"), {"job_id": "j3"})
    assert v3 == "v0003" and store.current("acme", "bot") == "v0001"
    assert store.fetch("acme", "bot", v3) is not None
    assert store.manifest("acme", "bot", v3) == {"job_id": "j3"}
    # Back to the newest, now and later.
    assert store.pin("acme", "bot", None) == "v0003" and store.pinned("acme", "bot") is None
    v4 = store.publish("acme", "bot", _adapter(tmp_path / "w4", b"w4"), {"job_id": "j4"})
    assert store.current("acme", "bot") == v4
    with pytest.raises(NotFound):
        store.pin("acme", "bot", "v0009")
    with pytest.raises(NotFound):
        store.pin("acme", "nobody", None)
    assert store.current("acme", "bot") == v4


def test_removing_a_version_frees_it_but_never_the_served_one(
    store: AdapterStore, tmp_path: Path
) -> None:
    for i in (1, 2):
        store.publish("acme", "bot", _adapter(tmp_path / f"w{i}", b"x" * 100 * i), {"job_id": i})
    assert store.size("acme", "bot", "v0001") > 100
    with pytest.raises(FailedPrecondition):
        store.remove_version("acme", "bot", "v0002")  # current
    store.pin("acme", "bot", "v0001")
    with pytest.raises(FailedPrecondition):
        store.remove_version("acme", "bot", "v0001")  # pinned
    store.remove_version("acme", "bot", "v0002")
    assert store.versions("acme", "bot") == ["v0001"] and store.size("acme", "bot", "v0002") == 0
    with pytest.raises(NotFound):
        store.remove_version("acme", "bot", "v0002")
    assert store.fetch("acme", "bot", "v0001") is not None


def test_unpublished_lists_what_no_name_serves(store: AdapterStore, tmp_path: Path) -> None:
    store.publish("acme", "kept", _adapter(tmp_path / "a", b"a"), {"job_id": "a"})
    store.publish("acme", "gone", _adapter(tmp_path / "b", b"b"), {"job_id": "b"})
    store.unpublish("acme", "gone")
    assert store.unpublished() == [("acme", "gone")]
    store.remove("acme", "gone")
    assert store.unpublished() == []


def test_versions_sort_by_number(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "data").create()
    for v in ("v9999", "v10000", "v0002"):
        layout.version_dir("acme", "bot", v).mkdir(parents=True)
    assert layout.versions("acme", "bot") == ["v0002", "v9999", "v10000"]
