"""Download archives (trainer/service/archive.py): a tar that tarfile reads back, the same
bytes (and sha256) on every call, and the digest of exactly the bytes sent."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
from pathlib import Path

from trainer.service.archive import ArchiveDigest, members, tar_stream


def _archive(folder: Path) -> tuple[bytes, ArchiveDigest]:
    digest = ArchiveDigest()

    async def read() -> bytes:
        return b"".join([c async for c in tar_stream(members(folder), digest)])

    return asyncio.run(read()), digest


def test_the_archive_holds_the_folder_and_is_the_same_every_time(tmp_path: Path) -> None:
    folder = tmp_path / "v0001"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 5000)  # > 1 chunk
    (folder / "empty.txt").write_bytes(b"")
    (folder / ".hidden").write_text("not shipped")
    (folder / "sub").mkdir()
    data, digest = _archive(folder)
    assert digest.size_bytes == len(data) and digest.sha256 == hashlib.sha256(data).hexdigest()
    assert len(data) % tarfile.RECORDSIZE == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert names == ["adapter_config.json", "adapter_model.safetensors", "empty.txt"]
        for name in names:
            member = tar.extractfile(name)
            assert member is not None and member.read() == (folder / name).read_bytes()
    # Touched files (new mtimes) give the same bytes: nothing of the host goes in.
    (folder / "empty.txt").touch()
    assert _archive(folder)[0] == data
