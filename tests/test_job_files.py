"""Datasets and checkpoints kept where every worker reads them (``trainer.job_files``), on a
real S3 server (Ceph's radosgw, ``tests.radosgw``): a dataset fetched on a host that never
saw it, whole and checked; checkpoints per attempt, the newest found, an upload cut off
never fetched; storage away is ``Unavailable``; one host needs none of it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from trainer.errors import InvalidArgument, NotFound, Unavailable
from trainer.job_files import LocalJobFiles, S3JobFiles, StoredCheckpoint, job_files_from_url
from trainer.layout import Layout

if TYPE_CHECKING:
    from tests.radosgw import RadosGateway, S3Bucket

pytest_plugins = ("tests.radosgw",)


def _host(s3_bucket: S3Bucket, root: Path) -> S3JobFiles:
    """One host's view: its own DATA, the shared bucket."""
    return S3JobFiles(s3_bucket.s3(prefix="jobfiles"), Layout(root).create())


def _dataset(files: S3JobFiles, content: bytes) -> str:
    sha256 = hashlib.sha256(content).hexdigest()
    files.layout.dataset_file(sha256).write_bytes(content)
    return sha256


def _checkpoint(folder: Path, step: int, weights: bytes) -> Path:
    ckpt = folder / f"checkpoint-{step}"
    (ckpt / "nested").mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(weights)
    (ckpt / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    (ckpt / "nested" / "rng_state.pth").write_bytes(b"rng" * 100)
    return ckpt


def _same_tree(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and all(
        (a / f).read_bytes() == (b / f).read_bytes() for f in files
    )


def test_a_dataset_kept_on_one_host_is_read_on_another(s3_bucket: S3Bucket, tmp_path) -> None:
    a, b = _host(s3_bucket, tmp_path / "a"), _host(s3_bucket, tmp_path / "b")
    content = b'{"messages": []}\n' * 5000
    sha256 = _dataset(a, content)
    a.keep_dataset(sha256)
    a.keep_dataset(sha256)  # again (another upload of the same bytes): nothing changes
    assert not b.layout.dataset_file(sha256).exists()
    got = b.dataset(sha256)
    assert got == b.layout.dataset_file(sha256) and got.read_bytes() == content
    assert list(b.layout.tmp.iterdir()) == []  # fetched beside, renamed into place
    # Bytes in storage that do not hash to the name are refused, and nothing is kept.
    other = hashlib.sha256(b"other").hexdigest()
    s3_bucket.client().put_object(
        Bucket=s3_bucket.bucket, Key=f"jobfiles/datasets/{other}", Body=b"tampered"
    )
    with pytest.raises(Unavailable, match="sha256"):
        b.dataset(other)
    assert not b.layout.dataset_file(other).exists() and list(b.layout.tmp.iterdir()) == []
    with pytest.raises(NotFound, match="neither on this host nor in object storage"):
        b.dataset(hashlib.sha256(b"never uploaded").hexdigest())
    # Forgotten: gone for a host that has no copy; a host's own copy is its own.
    a.forget_dataset(sha256)
    with pytest.raises(NotFound):
        _host(s3_bucket, tmp_path / "c").dataset(sha256)
    assert b.dataset(sha256).read_bytes() == content


def test_the_newest_whole_checkpoint_of_any_attempt_is_fetched(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    a, b = _host(s3_bucket, tmp_path / "a"), _host(s3_bucket, tmp_path / "b")
    assert b.newest_checkpoint("job-1") is None
    first = _checkpoint(tmp_path / "a1", 4, b"w4")
    a.keep_checkpoint("job-1", 1, first)
    a.keep_checkpoint("job-1", 1, _checkpoint(tmp_path / "a1", 8, b"w8"))
    # Attempt 2 (resumed from 8) saved step 12; attempt 1, paused meanwhile, wrote its own
    # step 12 after: neither touches the other's objects.
    second = _checkpoint(tmp_path / "a2", 12, b"attempt two")
    a.keep_checkpoint("job-1", 2, second)
    a.keep_checkpoint("job-1", 1, _checkpoint(tmp_path / "a1", 12, b"attempt one"))
    newest = b.newest_checkpoint("job-1")
    assert newest == StoredCheckpoint(2, "checkpoint-12") and newest.step == 12
    into = tmp_path / "b-attempt3" / "checkpoints"
    got = b.fetch_checkpoint("job-1", newest, into)
    assert got == into / "checkpoint-12" and _same_tree(got, second)
    assert [p.name for p in into.iterdir()] == ["checkpoint-12"]  # no partial folder left
    assert _same_tree(b.fetch_checkpoint("job-1", StoredCheckpoint(1, "checkpoint-4"), into),
                      first)  # fmt: skip
    # Another job's checkpoints are its own.
    assert b.newest_checkpoint("job-2") is None


def test_a_checkpoint_cut_off_mid_upload_is_never_fetched(
    s3_bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = _host(s3_bucket, tmp_path / "a")
    a.keep_checkpoint("job-1", 1, _checkpoint(tmp_path / "a1", 4, b"w4"))
    put = a.s3.put

    def dies_at_the_second_file(key: str, body, **kwargs) -> None:
        if key.endswith("trainer_state.json"):
            raise KeyboardInterrupt  # the service is killed mid-upload
        put(key, body, **kwargs)

    monkeypatch.setattr(a.s3, "put", dies_at_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        a.keep_checkpoint("job-1", 1, _checkpoint(tmp_path / "a1", 8, b"w8"))
    monkeypatch.undo()
    assert a.newest_checkpoint("job-1") == StoredCheckpoint(1, "checkpoint-4")
    with pytest.raises(NotFound):
        a.fetch_checkpoint("job-1", StoredCheckpoint(1, "checkpoint-8"), tmp_path / "x")
    # Forgetting the job removes every object of it, whole or not.
    a.forget_job("job-1")
    assert a.newest_checkpoint("job-1") is None
    listing = s3_bucket.client().list_objects_v2(Bucket=s3_bucket.bucket, Prefix="jobfiles/jobs/")
    assert listing.get("KeyCount", 0) == 0


def test_storage_away_is_unavailable_with_what_was_asked(
    radosgw: RadosGateway, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    files = S3JobFiles(
        s3_bucket.s3(prefix="jobfiles", connect_timeout=1, read_timeout=2, attempts=1),
        Layout(tmp_path / "a").create(),
    )
    sha256 = _dataset(files, b"rows\n")
    radosgw.stop_gateway()
    try:
        with pytest.raises(Unavailable, match=rf"object storage at .*datasets/{sha256}"):
            files.keep_dataset(sha256)
        with pytest.raises(Unavailable, match="list_objects_v2"):
            files.newest_checkpoint("job-1")
    finally:
        radosgw.start_gateway()
    files.keep_dataset(sha256)


def test_one_host_keeps_its_files_on_its_volume(tmp_path: Path) -> None:
    layout = Layout(tmp_path).create()
    files = job_files_from_url("", layout)
    assert isinstance(files, LocalJobFiles) and not files.shared
    sha256 = hashlib.sha256(b"x").hexdigest()
    assert files.dataset(sha256) == layout.dataset_file(sha256)
    assert files.newest_checkpoint("job-1") is None
    with pytest.raises(InvalidArgument, match="job_files"):
        job_files_from_url("https://bucket/prefix", layout)
