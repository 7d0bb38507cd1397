"""A job's input and its checkpoints where any worker can read them: what lets a job move
to another host.

One host, or hosts that share DATA, need nothing more than the volume: ``LocalJobFiles``.
With ``--job-files s3://BUCKET/PREFIX`` (``S3JobFiles``) the front-end that received a
dataset keeps a copy in object storage, the worker that claims the job fetches it, and each
checkpoint a run saves is kept there too, so a worker on another host resumes a job whose
first host died::

    <prefix>datasets/<sha256>                                   a dataset, content-addressed
    <prefix>jobs/<job_id>/<attempt>/checkpoint-<step>/<path>    a checkpoint's files
    <prefix>jobs/<job_id>/<attempt>/checkpoint-<step>.whole     written last: which files,
                                                                with their sizes

Keys carry the attempt: a worker paused past its lease and woken again never writes into
the checkpoint the next attempt keeps under the same step. A checkpoint without its
``.whole`` (an upload cut off) is never fetched. Fetched files land beside their place and
are renamed into it, so a folder named ``checkpoint-<step>`` or a dataset file is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from trainer.bucket import Bucket, Taken
from trainer.errors import NotFound, Unavailable
from trainer.layout import Layout
from trainer.names import check_name

WHOLE = ".whole"
_CHECKPOINT_RE = re.compile(r"checkpoint-([0-9]+)")


@dataclass(frozen=True)
class StoredCheckpoint:
    """A whole checkpoint in object storage: the attempt that saved it, and its name."""

    attempt: int
    name: str  # checkpoint-<step>

    @property
    def step(self) -> int:
        return int(self.name.split("-")[1])


class JobFiles(Protocol):
    shared: bool  # True where other hosts read these files: checkpoints are uploaded

    def keep_dataset(self, sha256: str) -> None:
        """Make the dataset stored at ``Layout.dataset_file(sha256)`` readable everywhere."""

    def dataset(self, sha256: str) -> Path:
        """The dataset's file on this host, fetched first if this host lacks it."""
        ...

    def forget_dataset(self, sha256: str) -> None:
        """Remove the shared copy of a dataset no record refers to any more."""

    def keep_checkpoint(self, job_id: str, attempt: int, checkpoint: Path) -> None:
        """Keep a whole ``checkpoint-<step>`` folder the job's ``attempt`` saved."""

    def newest_checkpoint(self, job_id: str) -> StoredCheckpoint | None:
        """The kept checkpoint with the highest step, of any attempt."""
        ...

    def fetch_checkpoint(self, job_id: str, found: StoredCheckpoint, into: Path) -> Path:
        """``found`` as ``into/<its name>``; that folder is returned."""
        ...

    def forget_job(self, job_id: str) -> None:
        """Remove every checkpoint kept for the job."""


class LocalJobFiles:
    """Everything on this host's volume (or on a volume the hosts share): nothing to copy."""

    shared = False

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def keep_dataset(self, sha256: str) -> None:
        pass

    def dataset(self, sha256: str) -> Path:
        return self.layout.dataset_file(sha256)

    def forget_dataset(self, sha256: str) -> None:
        pass

    def keep_checkpoint(self, job_id: str, attempt: int, checkpoint: Path) -> None:
        pass

    def newest_checkpoint(self, job_id: str) -> StoredCheckpoint | None:
        return None  # the volume's own (``Layout.resume_point``) is all there is

    def fetch_checkpoint(self, job_id: str, found: StoredCheckpoint, into: Path) -> Path:
        raise NotFound(f"job {job_id} keeps no checkpoint outside this volume")

    def forget_job(self, job_id: str) -> None:
        pass


class S3JobFiles:
    """Datasets and checkpoints as objects under ``s3://<bucket>/<prefix>``."""

    shared = True

    def __init__(self, s3: Bucket, layout: Layout) -> None:
        self.s3, self.layout = s3, layout

    def _dataset_key(self, sha256: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"{sha256!r} is not a sha256")
        return f"{self.s3.prefix}datasets/{sha256}"

    def _job_prefix(self, job_id: str) -> str:
        return f"{self.s3.prefix}jobs/{check_name(job_id, 'job_id')}/"

    # ------------------------------------------------------------------ datasets
    def keep_dataset(self, sha256: str) -> None:
        key = self._dataset_key(sha256)
        with open(self.layout.dataset_file(sha256), "rb") as f, contextlib.suppress(Taken):
            self.s3.put(key, f, create=True)  # taken: the same bytes are there already

    def dataset(self, sha256: str) -> Path:
        final = self.layout.dataset_file(sha256)
        if final.exists():
            return final
        key = self._dataset_key(sha256)
        head = self.s3.call("head_object", key, Key=key)
        if head is None:
            raise NotFound(f"dataset {sha256} is neither on this host nor in object storage")
        tmp = self.layout.tmp / f"fetch-{sha256}-{uuid.uuid4().hex}"
        try:
            self.s3.download(key, tmp, int(head["ContentLength"]))
            if (got := _sha256(tmp)) != sha256:
                raise Unavailable(f"{key} holds bytes whose sha256 is {got}, not {sha256}")
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return final

    def forget_dataset(self, sha256: str) -> None:
        self.s3.delete([self._dataset_key(sha256)])

    # ------------------------------------------------------------------ checkpoints
    def keep_checkpoint(self, job_id: str, attempt: int, checkpoint: Path) -> None:
        if not _CHECKPOINT_RE.fullmatch(checkpoint.name):
            raise ValueError(f"{checkpoint} is not a checkpoint-<step> folder")
        base = f"{self._job_prefix(job_id)}{attempt}/{checkpoint.name}"
        files = {}
        for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
            rel = path.relative_to(checkpoint).as_posix()
            with open(path, "rb") as f:
                files[rel] = os.fstat(f.fileno()).st_size
                self.s3.put(f"{base}/{rel}", f)
        self.s3.put(base + WHOLE, json.dumps({"files": files}, sort_keys=True).encode())

    def newest_checkpoint(self, job_id: str) -> StoredCheckpoint | None:
        prefix = self._job_prefix(job_id)
        found = []
        for obj in self.s3.objects(prefix):
            attempt, _, name = obj["Key"][len(prefix) :].partition("/")
            if attempt.isdigit() and name.endswith(WHOLE):
                name = name.removesuffix(WHOLE)
                if _CHECKPOINT_RE.fullmatch(name):
                    found.append(StoredCheckpoint(int(attempt), name))
        return max(found, key=lambda c: (c.step, c.attempt), default=None)

    def fetch_checkpoint(self, job_id: str, found: StoredCheckpoint, into: Path) -> Path:
        base = f"{self._job_prefix(job_id)}{found.attempt}/{found.name}"
        listed = self.s3.get(base + WHOLE)
        if listed is None:
            raise NotFound(f"job {job_id} keeps no {found.name} of attempt {found.attempt}")
        files: dict[str, int] = json.loads(listed)["files"]
        target = into / found.name
        tmp = into / f"{found.name}.tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            for rel, size in files.items():
                dest = (tmp / rel).resolve()
                if not dest.is_relative_to(tmp.resolve()):  # a key may not lead out
                    raise Unavailable(f"{base}{WHOLE} names {rel!r}, outside the checkpoint")
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.s3.download(f"{base}/{rel}", dest, size)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def forget_job(self, job_id: str) -> None:
        keys = [obj["Key"] for obj in self.s3.objects(self._job_prefix(job_id))]
        self.s3.delete(sorted(keys, key=lambda k: not k.endswith(WHOLE)))  # .whole first


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def job_files_from_url(url: str, layout: Layout) -> JobFiles:
    """The store ``url`` names: "" for this host's volume, or ``s3://bucket/prefix``."""
    return S3JobFiles(Bucket.from_url(url, "job_files"), layout) if url else LocalJobFiles(layout)
