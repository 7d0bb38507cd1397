"""The shared volume's layout, the one place that builds paths under ``DATA``.

::

    DATA/
      trainer.db                         job store (SQLite, WAL)
      tenants.json                       tenants and hashed API keys
      datasets/<sha256>                  dataset files, content-addressed
      jobs/<job_id>/                     a job's folder (``JobFolder``): spec.json, worker.log,
                                         rows/, checkpoints/, output/, curves/
      jobs/<job_id>/attempt-<n>/         a later attempt's own (``Layout.attempt``)
      adapters/<tenant>/<adapter>/<version>/   immutable published versions
      adapters/<tenant>/<adapter>/current      names the version served (the newest, or
                                               the pinned one)
      adapters/<tenant>/<adapter>/pinned       names the version pinned (SetServedVersion)
      adapters/.staging/                 publishing in progress (same filesystem)
      adapter-cache/                     versions fetched from object storage, if it holds them
      exports/<tenant>/<job_id>/         merged models (MERGE_EXPORT jobs)
      exports/.staging/                  exports in progress
      tmp/                               uploads in progress

Every name is validated before it is joined onto a path; this module is
imported by the vLLM plugin too, so it stays free of heavy imports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from trainer.names import check_id, check_name

VERSION_RE = re.compile(r"v[0-9]{4,9}")
CURRENT = "current"
PINNED = "pinned"
ADAPTER_CACHE = "adapter-cache"


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Layout:
    """Paths under one data directory."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "trainer.db"

    @property
    def tenants_file(self) -> Path:
        return self.root / "tenants.json"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def jobs(self) -> Path:
        return self.root / "jobs"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def staging(self) -> Path:
        return self.adapters / ".staging"

    @property
    def adapter_cache(self) -> Path:
        """Versions fetched from object storage (``trainer.object_store``), for vLLM."""
        return self.root / ADAPTER_CACHE

    @property
    def exports(self) -> Path:
        return self.root / "exports"

    @property
    def export_staging(self) -> Path:
        return self.exports / ".staging"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def create(self) -> Layout:
        for d in (
            self.root,
            self.datasets,
            self.jobs,
            self.adapters,
            self.staging,
            self.exports,
            self.export_staging,
            self.tmp,
        ):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def sweep(self) -> list[str]:
        """Remove what a killed trainer left half-done; return the names removed.

        Uploads in progress live in ``tmp/`` and publishes in progress in
        ``adapters/.staging/`` (its ``deleted-*`` folders are removals in progress); after
        a ``kill -9`` nothing will finish them. Only the trainer calls this, once, before
        it serves: nothing of its own is in flight then, and vLLM never reads either.
        """
        removed = []
        for folder in (self.tmp, self.staging, self.export_staging):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(f"{folder.name}/{p.name}")
        return removed

    def dataset_file(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.datasets / sha256

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / check_id(job_id, "job_id")

    def job(self, job_id: str) -> JobFolder:
        return JobFolder(self.job_dir(job_id))

    def attempt(self, job_id: str, attempt: int) -> JobFolder:
        """Where one attempt (one claim) of a job works: the job's folder for the first,
        ``attempt-<n>/`` inside it for a later one, so a worker that lost its claim (a
        paused host) never writes where the next attempt works."""
        root = self.job_dir(job_id)
        return JobFolder(root if attempt <= 1 else root / f"attempt-{attempt}")

    def attempts(self, job_id: str) -> list[JobFolder]:
        """Every attempt's folder of a job, the first first."""
        root = self.job_dir(job_id)
        later = [p for p in root.glob("attempt-*") if p.name.split("-")[1].isdigit()]
        return [JobFolder(root)] + [
            JobFolder(p) for p in sorted(later, key=lambda p: int(p.name.split("-")[1]))
        ]

    def resume_point(self, job_id: str) -> Path | None:
        """The newest complete checkpoint any attempt of the job left, or None."""
        found = [c for f in self.attempts(job_id) if (c := f.last_checkpoint()) is not None]
        return max(found, key=lambda c: int(c.name.split("-")[1]), default=None)

    def export_dir(self, tenant: str, job_id: str) -> Path:
        return self.exports / check_name(tenant, "tenant") / check_id(job_id, "job_id")

    def adapter_dir(self, tenant: str, adapter: str) -> Path:
        return self.adapters / check_name(tenant, "tenant") / check_name(adapter, "adapter_name")

    def version_dir(self, tenant: str, adapter: str, version: str) -> Path:
        if not VERSION_RE.fullmatch(version):
            raise ValueError(f"not a version: {version!r}")
        return self.adapter_dir(tenant, adapter) / version

    def current_version(self, tenant: str, adapter: str) -> str | None:
        """The version ``<tenant>/<adapter>`` points at, or None when it is not published."""
        return self._pointer(tenant, adapter, CURRENT)

    def pinned_version(self, tenant: str, adapter: str) -> str | None:
        """The version pinned as served, or None when the newest is served."""
        return self._pointer(tenant, adapter, PINNED)

    def _pointer(self, tenant: str, adapter: str, name: str) -> str | None:
        try:
            version = (self.adapter_dir(tenant, adapter) / name).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return version if VERSION_RE.fullmatch(version) else None

    def current_dir(self, tenant: str, adapter: str) -> Path | None:
        """The folder of the newest published version, or None."""
        version = self.current_version(tenant, adapter)
        if version is None:
            return None
        path = self.version_dir(tenant, adapter, version)
        return path if (path / "adapter_config.json").is_file() else None

    def versions(self, tenant: str, adapter: str) -> list[str]:
        """Every version folder of an adapter, oldest first."""
        d = self.adapter_dir(tenant, adapter)
        if not d.is_dir():
            return []
        found = [p.name for p in d.iterdir() if p.is_dir() and VERSION_RE.fullmatch(p.name)]
        return sorted(found, key=lambda v: int(v[1:]))  # by number: v9999 before v10000


@dataclass(frozen=True)
class JobFolder:
    """What one job keeps under ``DATA/jobs/<job_id>/``."""

    root: Path

    @property
    def spec(self) -> Path:
        """What the worker is to do (``trainer.config.JobSpec``), written at each start."""
        return self.root / "spec.json"

    @property
    def log(self) -> Path:
        """The worker's library output and tracebacks."""
        return self.root / "worker.log"

    @property
    def rows(self) -> Path:
        """The tokenized rows the worker trains on (Arrow files)."""
        return self.root / "rows"

    @property
    def checkpoints(self) -> Path:
        """The Trainer's ``checkpoint-<step>`` folders: what a restarted job resumes from."""
        return self.root / "checkpoints"

    @property
    def output(self) -> Path:
        """The finished adapter, before it is published."""
        return self.root / "output"

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint: the one rule for "can this job resume", used by
        the scheduler (after a restart) and the recipe (when it starts). The Trainer writes
        ``trainer_state.json`` last, so a folder with a readable one is whole; newer,
        half-written ones (a kill mid-save) are removed."""
        if not self.checkpoints.is_dir():
            return None
        found = sorted(
            (int(p.name.split("-")[1]), p)
            for p in self.checkpoints.iterdir()
            if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-")[1].isdigit()
        )
        for _, path in reversed(found):
            try:
                json.loads((path / "trainer_state.json").read_text())
                return path
            except (OSError, ValueError):
                shutil.rmtree(path, ignore_errors=True)
        return None
