"""A folder as a tar stream, the same bytes every time, hashed as it goes (``Download``).

Uncompressed: safetensors weights do not compress. Each file is a regular member with
fixed owner, mode and time, in name order, so a version's archive (and its sha256) is
the same on every call. Files are read in chunks off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 1 << 20  # under the service's 4 MiB message cap
_BLOCK = tarfile.BLOCKSIZE


@dataclass
class ArchiveDigest:
    """Filled in as the stream is read: the archive's size and sha256 once it has ended."""

    size_bytes: int = 0
    sha256: str = ""


def members(folder: Path) -> list[Path]:
    """The regular files an archive of ``folder`` holds (its top level; hidden ones left
    out), in name order."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and p.name[0] != "."
    )


def _header(path: Path, size: int) -> bytes:
    info = tarfile.TarInfo(path.name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT)


async def tar_stream(files: list[Path], digest: ArchiveDigest) -> AsyncIterator[bytes]:
    """The tar archive of ``files`` (flat, by base name), in chunks; ``digest`` is set at
    the end."""
    h = hashlib.sha256()
    total = 0

    def out(data: bytes) -> bytes:
        nonlocal total
        h.update(data)
        total += len(data)
        return data

    for path in files:
        with open(path, "rb") as f:
            size = path.stat().st_size
            yield out(_header(path, size))
            sent = 0
            while sent < size:
                chunk = await asyncio.to_thread(f.read, min(CHUNK_BYTES, size - sent))
                if not chunk:
                    raise OSError(f"{path.name} shrank while it was read")
                sent += len(chunk)
                yield out(chunk)
            if size % _BLOCK:
                yield out(b"\0" * (_BLOCK - size % _BLOCK))
    end = 2 * _BLOCK  # two zero blocks, then zeros up to a whole record, as tar writes
    end += -(total + end) % tarfile.RECORDSIZE
    yield out(b"\0" * end)
    digest.size_bytes, digest.sha256 = total, h.hexdigest()
