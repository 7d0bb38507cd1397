"""What only object storage must do (``trainer.object_store``), on a real S3 server (Ceph's
radosgw, ``tests.radosgw``): create-only writes, publishers racing for a number, crashed
publishes, the local cache, storage going away and coming back, hostile names. The rules
every store shares are in ``tests/test_adapter_store.py``."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import ClientError

from trainer.adapter_store import LocalAdapterStore
from trainer.errors import InvalidArgument, Unavailable
from trainer.layout import Layout
from trainer.object_store import S3AdapterStore, adapter_store_from_url

if TYPE_CHECKING:
    from tests.radosgw import RadosGateway, S3Bucket

pytest_plugins = ("tests.radosgw",)


def _adapter(folder: Path, weights: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


def _keys(bucket: S3Bucket) -> list[str]:
    listing = bucket.client().list_objects_v2(Bucket=bucket.bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


@pytest.fixture
def store(s3_bucket: S3Bucket, tmp_path: Path) -> S3AdapterStore:
    return s3_bucket.store(tmp_path / "cache")


def test_a_version_is_written_once_and_the_server_refuses_a_second_write(
    store: S3AdapterStore, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    v1 = store.publish("acme", "bot", _adapter(tmp_path / "one", b"one"), {"job_id": "j1"})
    assert _keys(s3_bucket) == [
        "acme/bot/current",
        "acme/bot/v0001/.claim",
        "acme/bot/v0001/adapter_config.json",
        "acme/bot/v0001/adapter_model.safetensors",
        "acme/bot/v0001/manifest.json",
    ]
    # Not our code's politeness: the server itself refuses to replace a version's object.
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3_bucket.client().put_object(
            Bucket=s3_bucket.bucket,
            Key=f"acme/bot/{v1}/adapter_model.safetensors",
            Body=b"evil",
            IfNoneMatch="*",
        )
    folder = store.fetch("acme", "bot", v1)
    assert folder is not None and (folder / "adapter_model.safetensors").read_bytes() == b"one"


def test_a_publisher_that_lost_the_race_for_a_number_takes_the_next(
    store: S3AdapterStore, s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.publish("acme", "bot", _adapter(tmp_path / "one", b"one"), {"job_id": "j1"})
    # A second publisher that listed before the first one's claim landed: it tries v0001.
    late = s3_bucket.store(tmp_path / "cache2")
    monkeypatch.setattr(late, "_scan", lambda t, a: ([], 0, []))
    assert late.publish("acme", "bot", _adapter(tmp_path / "two", b"two"), {"job_id": "j2"}) == (
        "v0002"
    )
    monkeypatch.undo()
    for version, weights in (("v0001", b"one"), ("v0002", b"two")):
        folder = store.fetch("acme", "bot", version)
        assert folder is not None and (folder / "adapter_model.safetensors").read_bytes() == weights


def test_racing_publishers_each_get_a_whole_version_of_their_own(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    jobs = [f"job-{i}" for i in range(6)]
    sources = {job: _adapter(tmp_path / job, job.encode() * 1000) for job in jobs}
    got: dict[str, str] = {}
    start = threading.Barrier(len(jobs))

    def publish(job: str) -> None:
        own = s3_bucket.store(tmp_path / f"cache-{job}")
        start.wait()
        got[job] = own.publish("acme", "bot", sources[job], {"job_id": job})

    threads = [threading.Thread(target=publish, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = s3_bucket.store(tmp_path / "cache")
    assert (
        sorted(got.values()) == store.versions("acme", "bot") == [f"v{i:04d}" for i in range(1, 7)]
    )
    for job, version in got.items():
        folder = store.fetch("acme", "bot", version)
        assert folder is not None
        assert (folder / "adapter_model.safetensors").read_bytes() == job.encode() * 1000
        assert store.manifest("acme", "bot", version) == {"job_id": job}


def test_a_crashed_publish_is_never_listed_or_served_and_blocks_nothing(
    store: S3AdapterStore, s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.publish("acme", "bot", _adapter(tmp_path / "one", b"one"), {"job_id": "j1"})
    put = store.s3.put

    def crash_at_manifest(key: str, body: Any, **kwargs: Any) -> None:
        if key.endswith("/manifest.json"):
            raise KeyboardInterrupt  # the publisher dies before the version is whole
        put(key, body, **kwargs)

    monkeypatch.setattr(store.s3, "put", crash_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        store.publish("acme", "bot", _adapter(tmp_path / "two", b"two"), {"job_id": "j2"})
    monkeypatch.undo()
    # v0002's files are there, but without its manifest it does not exist.
    assert store.versions("acme", "bot") == ["v0001"] and store.current("acme", "bot") == "v0001"
    assert (
        store.fetch("acme", "bot", "v0002") is None
        and store.manifest("acme", "bot", "v0002") is None
    )
    assert not (tmp_path / "cache" / "acme" / "bot" / "v0002").exists()
    # The job, restarted, publishes whole under the next number.
    v = store.publish("acme", "bot", _adapter(tmp_path / "two2", b"two"), {"job_id": "j2"})
    assert v == "v0003" and store.versions("acme", "bot") == ["v0001", "v0003"]
    assert store.current("acme", "bot") == "v0003"
    # The service's start sweeps what the crash left once it is an hour old (a younger one
    # may be another host's publish still going on): the files go, the claim stays.
    left = ["acme/bot/v0002/.claim", "acme/bot/v0002/adapter_config.json",
            "acme/bot/v0002/adapter_model.safetensors"]  # fmt: skip
    assert store.sweep_unfinished() == [] and [k for k in _keys(s3_bucket) if "v0002" in k] == left
    assert store.sweep_unfinished(older_than_s=0) == ["acme/bot/v0002"]
    assert [k for k in _keys(s3_bucket) if "v0002" in k] == ["acme/bot/v0002/.claim"]
    assert store.versions("acme", "bot") == ["v0001", "v0003"]  # whole versions untouched
    assert store.fetch("acme", "bot", "v0001") is not None
    assert store.sweep_unfinished(older_than_s=0) == []  # a removed version is not unfinished
    v = store.publish("acme", "bot", _adapter(tmp_path / "four", b"four"), {"job_id": "j4"})
    assert v == "v0004"  # the swept number is never taken again


def test_fetch_is_atomic_verified_and_reused(
    store: S3AdapterStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = bytes(range(256)) * 4096  # 1 MiB
    store.publish("acme", "bot", _adapter(tmp_path / "one", weights), {"job_id": "j1"})
    parent = tmp_path / "cache" / "acme" / "bot"
    download = store.s3.download

    def dies_midway(key: str, dest: Path, size: int) -> None:
        if key.endswith("adapter_model.safetensors"):
            dest.write_bytes(weights[:1000])
            raise Unavailable("connection reset")
        download(key, dest, size)

    monkeypatch.setattr(store.s3, "download", dies_midway)
    with pytest.raises(Unavailable):
        store.fetch("acme", "bot", "v0001")
    assert not parent.exists() or list(parent.iterdir()) == []  # nothing half-there
    monkeypatch.undo()

    # A short read is caught by the size check, not served.
    def short(key: str, dest: Path, size: int) -> None:
        download(key, dest, size + 1)

    monkeypatch.setattr(store.s3, "download", short)
    with pytest.raises(Unavailable, match="bytes of"):
        store.fetch("acme", "bot", "v0001")
    assert not parent.exists() or list(parent.iterdir()) == []
    monkeypatch.undo()

    folder = store.fetch("acme", "bot", "v0001")
    assert folder == parent / "v0001" and [p.name for p in parent.iterdir()] == ["v0001"]
    assert (folder / "adapter_model.safetensors").read_bytes() == weights
    # Reused: nothing downloaded again.
    calls: list[str] = []
    monkeypatch.setattr(store.s3, "download", lambda k, d, s: calls.append(k))
    assert store.fetch("acme", "bot", "v0001") == folder and calls == []


def test_downloads_a_killed_process_left_are_swept_once_old(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    parent = tmp_path / "cache" / "acme" / "bot"
    old, fresh = parent / "v0001.tmp-dead", parent / "v0001.tmp-busy"
    for folder in (old, fresh):
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    s3_bucket.store(tmp_path / "cache")
    assert not old.exists() and fresh.exists()  # a fetch in flight elsewhere is left alone


def test_a_name_published_again_never_serves_the_old_cached_copy(
    store: S3AdapterStore, tmp_path: Path
) -> None:
    store.publish("acme", "bot", _adapter(tmp_path / "old", b"old"), {"job_id": "j1"})
    old = store.fetch("acme", "bot", "v0001")
    assert old is not None and (old / "adapter_model.safetensors").read_bytes() == b"old"
    store.remove("acme", "bot")
    assert store.fetch("acme", "bot", "v0001") is None
    store.publish("acme", "bot", _adapter(tmp_path / "new", b"new"), {"job_id": "j2"})
    new = store.fetch("acme", "bot", "v0001")
    assert new is not None and (new / "adapter_model.safetensors").read_bytes() == b"new"


def test_a_removed_version_number_is_not_handed_out_again(
    store: S3AdapterStore, tmp_path: Path
) -> None:
    for i in (1, 2, 3):
        store.publish("acme", "bot", _adapter(tmp_path / f"w{i}", b"w%d" % i), {"job_id": i})
    store.pin("acme", "bot", "v0001")
    store.remove_version("acme", "bot", "v0003")
    assert store.versions("acme", "bot") == ["v0001", "v0002"]
    v = store.publish("acme", "bot", _adapter(tmp_path / "w4", b"w4"), {"job_id": 4})
    assert v == "v0004" and store.current("acme", "bot") == "v0001"


def test_storage_down_is_unavailable_with_a_reason_and_recovers(
    radosgw: RadosGateway, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    store = s3_bucket.store(tmp_path / "cache", connect_timeout=1, attempts=1)
    store.publish("acme", "bot", _adapter(tmp_path / "one", b"one"), {"job_id": "j1"})
    radosgw.stop_gateway()
    try:
        with pytest.raises(Unavailable) as down:
            store.current("acme", "bot")
        message = str(down.value)
        assert radosgw.endpoint in message and "get_object" in message
        assert f"s3://{s3_bucket.bucket}/acme/bot/current" in message
        with pytest.raises(Unavailable, match="did not answer"):
            store.publish("acme", "bot", _adapter(tmp_path / "two", b"two"), {"job_id": "j2"})
        with pytest.raises(Unavailable):
            store.fetch("acme", "bot", "v0001")
    finally:
        radosgw.start_gateway()
    # Back without anyone's help: same client, same store.
    assert store.current("acme", "bot") == "v0001"
    v = store.publish("acme", "bot", _adapter(tmp_path / "two2", b"two"), {"job_id": "j2"})
    assert v == "v0002" and store.fetch("acme", "bot", v) is not None


@pytest.mark.parametrize(
    ("tenant", "adapter", "version"),
    [
        ("..", "bot", "v0001"),
        ("acme", "../other/bot", "v0001"),
        ("acme", "bot/../../x", "v0001"),
        ("/abs", "bot", "v0001"),
        ("acme", "b\u043et", "v0001"),  # a Cyrillic o
        ("acme", "bot%2F..", "v0001"),
        ("acme", "bot", "../v0001"),
        ("acme", "bot", "v0001/../../x"),
        ("acme", "bot", "current"),
    ],
)
def test_hostile_names_never_reach_a_key(
    store: S3AdapterStore,
    s3_bucket: S3Bucket,
    tmp_path: Path,
    tenant: str,
    adapter: str,
    version: str,
) -> None:
    for call in (store.fetch, store.manifest, store.size, store.remove_version):
        with pytest.raises(InvalidArgument):
            call(tenant, adapter, version)
    if version == "v0001":  # the names are the hostile part
        with pytest.raises(InvalidArgument):
            store.publish(tenant, adapter, _adapter(tmp_path / "a", b"w"), {"job_id": "j"})
        for op in (store.current, store.pinned, store.versions, store.unpublish, store.remove):
            with pytest.raises(InvalidArgument):
                op(tenant, adapter)
        assert store.names(tenant) == []
    assert _keys(s3_bucket) == [] and not (tmp_path / "cache").exists()


def test_keys_stay_under_the_prefix_and_the_url_picks_the_store(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = Layout(tmp_path / "data").create()
    assert isinstance(adapter_store_from_url("", layout, tmp_path / "c"), LocalAdapterStore)
    for bad in ("http://x/y", "s3://", "/data/adapters"):
        with pytest.raises(InvalidArgument):
            adapter_store_from_url(bad, layout, tmp_path / "c")
    for name, value in s3_bucket.env().items():
        monkeypatch.setenv(name, value)
    store = adapter_store_from_url(f"s3://{s3_bucket.bucket}/team/a", layout, tmp_path / "c")
    assert isinstance(store, S3AdapterStore)
    store.publish("acme", "bot", _adapter(tmp_path / "a", b"w"), {"job_id": "j"})
    assert all(k.startswith("team/a/acme/bot/") for k in _keys(s3_bucket))
    # Another prefix in the same bucket is another store.
    other = adapter_store_from_url(f"s3://{s3_bucket.bucket}/team/b", layout, tmp_path / "d")
    assert other.versions("acme", "bot") == [] and other.unpublished() == []
    assert store.unpublished() == [] and store.names("acme") == ["bot"]
