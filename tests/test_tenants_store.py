"""Tenants in object storage (``--tenants-store s3://...``, ``trainer.tenants.TenantObjects``)
on a real S3 server (Ceph's radosgw, ``tests.radosgw``): two hosts' registries on one
bucket see each other's changes within the refresh; the storage decides a race for a
name; readers keep what they read while storage is away, and one that never read answers
``Unavailable``."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from trainer.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from trainer.processes import wait_for
from trainer.tenants import TenantFile, TenantObjects, TenantRegistry, tenant_registry

if TYPE_CHECKING:
    from tests.radosgw import RadosGateway, S3Bucket

pytest_plugins = ("tests.radosgw",)


def _host(bucket: S3Bucket, **kwargs) -> TenantRegistry:
    return TenantRegistry(TenantObjects(bucket.s3(prefix="ops", **kwargs), refresh_s=0.2))


def test_a_tenant_added_on_one_host_is_known_on_the_other(s3_bucket: S3Bucket) -> None:
    a, b = _host(s3_bucket), _host(s3_bucket)
    assert b.list() == []  # read once: empty
    key = a.add("acme")
    admin = a.add("ops", admin=True)
    assert a.authenticate(key).name == "acme"  # the writer knows at once
    wait_for(lambda: b.authenticate(key) is not None, timeout=10)
    assert b.authenticate(key).name == "acme" and not b.authenticate(key).admin
    assert b.authenticate(admin).admin and b.authenticate("ft-not-a-key") is None
    assert [t.name for t in b.list()] == ["acme", "ops"]
    # One object a tenant, holding the key's hash only.
    listing = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.bucket, Prefix="ops/")
    assert sorted(o["Key"] for o in listing["Contents"]) == [
        "ops/tenants/acme.json",
        "ops/tenants/ops.json",
    ]
    body = s3_bucket.client().get_object(Bucket=s3_bucket.bucket, Key="ops/tenants/acme.json")
    assert key.encode() not in body["Body"].read()
    # Removed on B: A stops accepting the key within the refresh.
    b.remove("acme")
    wait_for(lambda: a.authenticate(key) is None, timeout=10)
    with pytest.raises(NotFound):
        a.remove("acme")
    with pytest.raises(NotFound):
        a.remove("ACME")  # another name, though it folds to the same object
    with pytest.raises(InvalidArgument):
        a.add("../x")


def test_the_storage_decides_a_race_for_one_name(s3_bucket: S3Bucket) -> None:
    hosts = [_host(s3_bucket) for _ in range(6)]
    names = ["Acme", "acme", "ACME", "aCme", "acmE", "AcMe"]  # one name, folded
    won, lost = [], []

    def add(reg: TenantRegistry, name: str) -> None:
        try:
            won.append((name, reg.add(name)))
        except AlreadyExists:
            lost.append(name)

    threads = [threading.Thread(target=add, args=pair) for pair in zip(hosts, names, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 5, (won, lost)
    (name, key), reader = won[0], _host(s3_bucket)
    assert reader.authenticate(key).name == name


def test_storage_away_keeps_what_was_read_and_a_new_reader_unavailable(
    radosgw: RadosGateway, s3_bucket: S3Bucket
) -> None:
    writer = _host(s3_bucket)
    key = writer.add("acme")
    reader = _host(s3_bucket, connect_timeout=1, read_timeout=2, attempts=1)
    assert reader.authenticate(key).name == "acme"
    radosgw.stop_gateway()
    try:
        # Polls fail in the background; the reader answers from what it read.
        threading.Event().wait(1.0)
        assert reader.authenticate(key).name == "acme"
        fresh = _host(s3_bucket, connect_timeout=1, read_timeout=2, attempts=1)
        with pytest.raises(Unavailable, match="object storage at"):
            fresh.authenticate(key)
        with pytest.raises(Unavailable):
            writer.add("other")
    finally:
        radosgw.start_gateway()
    # Back: the fresh reader's poll reads the tenants without a restart.
    wait_for(lambda: _ok(fresh, key), timeout=30)


def _ok(reg: TenantRegistry, key: str) -> bool:
    try:
        return reg.authenticate(key) is not None
    except Unavailable:
        return False


def test_without_a_store_the_tenants_file_is_used(tmp_path: Path) -> None:
    reg = tenant_registry(tmp_path / "tenants.json", "")
    assert isinstance(reg.source, TenantFile)
    key = reg.add("acme")
    assert TenantRegistry(tmp_path / "tenants.json").authenticate(key).name == "acme"
    with pytest.raises(InvalidArgument, match="tenants_store"):
        tenant_registry(None, "http://bucket/prefix")
