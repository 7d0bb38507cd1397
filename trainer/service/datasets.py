"""Dataset ingest: a streamed upload becomes a content-addressed, checked dataset file.

Bytes are written to a temporary file under ``DATA/tmp`` while they are hashed
and counted; past the size limit, on a cut-off stream, or on a file that fails
the structural check (``trainer.data.examples.scan``: every line, JSONL or Parquet),
the temporary file is removed and nothing is recorded. Only a complete, valid
upload is renamed to ``DATA/datasets/<sha256>``. The tenant's stored-bytes quota bounds an
upload like the size limit does; a retried upload (same ``request_id``) returns the
dataset the first one stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator

from trainer.data.examples import scan
from trainer.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from trainer.job_files import JobFiles, LocalJobFiles
from trainer.layout import Layout, fsync_dir
from trainer.names import check_name
from trainer.service.store import DatasetRecord, Store, new_id
from trainer.service.usage import Quotas, UsageMeter

log = logging.getLogger(__name__)


class DatasetIngest:
    """Receives uploads and manages the tenant's dataset records and files."""

    def __init__(
        self,
        store: Store,
        layout: Layout,
        max_bytes: int,
        min_examples: int,
        meter: UsageMeter,
        quotas: Quotas,
        files: JobFiles | None = None,
    ) -> None:
        self.files = files or LocalJobFiles(layout)
        self.store = store
        self.layout = layout
        self.max_bytes = max_bytes
        self.min_examples = min_examples
        self.meter = meter
        self.quotas = quotas

    async def upload(
        self,
        tenant: str,
        name: str,
        chunks: AsyncIterator[bytes],
        size_bytes: int | None = None,
        sha256: str | None = None,
        request_id: str = "",
    ) -> DatasetRecord:
        check_name(name, "header.name")
        if request_id:
            check_name(request_id, "header.request_id")
            if earlier := self.store.find_dataset_by_request(tenant, request_id):
                return earlier
        if size_bytes is not None and size_bytes > self.max_bytes:
            raise ResourceExhausted(
                f"header.size_bytes: {size_bytes} bytes exceeds the limit of {self.max_bytes}"
            )
        room = self.quotas.room(self.meter, tenant)
        if room is not None and (room == 0 or (size_bytes or 0) > room):
            raise self.quotas.exceeded(self.meter, tenant)
        if self.store.find_dataset_by_name(tenant, name):
            raise AlreadyExists(f"header.name: dataset {name!r} exists")
        tmp = self.layout.tmp / f"upload-{new_id('ds')}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise ResourceExhausted(
                            f"upload exceeds the limit of {self.max_bytes} bytes"
                        )
                    if room is not None and size > room:
                        raise self.quotas.exceeded(self.meter, tenant)
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            hexdigest = digest.hexdigest()
            if size_bytes is not None and size != size_bytes:
                raise InvalidArgument(
                    "header.size_bytes", f"announced {size_bytes} bytes, received {size}"
                )
            if sha256 is not None and sha256.lower() != hexdigest:
                raise InvalidArgument("header.sha256", f"announced {sha256}, received {hexdigest}")
            found = await asyncio.to_thread(scan, tmp, self.min_examples)
            final = self.layout.dataset_file(hexdigest)
            os.replace(tmp, final)  # same content under the same name: replacing is harmless
            fsync_dir(final.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        try:  # where a worker on another host reads it (nothing to do on one host)
            await asyncio.to_thread(self.files.keep_dataset, hexdigest)
        except Exception:
            self._collect(hexdigest)  # not recorded: the upload did not happen
            raise
        rec = DatasetRecord(
            id=new_id("ds"),
            tenant=tenant,
            name=name,
            sha256=hexdigest,
            size_bytes=size,
            num_rows=found.examples,
            format=found.format,
            file_type=found.file_type,
            created_at=time.time(),
            request_id=request_id,
        )
        try:
            stored = self.store.add_dataset(rec)
        except AlreadyExists:  # a concurrent upload took the name
            self._collect(hexdigest)
            raise
        if stored.id != rec.id:  # a concurrent retry of the same request stored it first
            self._collect(hexdigest)
        return stored

    def get(self, tenant: str, dataset_id: str) -> DatasetRecord:
        rec = self.store.get_dataset(tenant, dataset_id)
        if rec is None:
            raise NotFound(f"dataset {dataset_id!r} not found")
        return rec

    def delete(self, tenant: str, dataset_id: str) -> None:
        rec = self.get(tenant, dataset_id)
        busy = [
            j.id
            for j in self.store.list_jobs(tenant)
            if dataset_id in (j.dataset_id, j.validation_dataset_id) and not j.state.terminal
        ]
        if busy:
            raise FailedPrecondition(
                f"dataset {dataset_id!r} is used by unfinished job(s) {', '.join(busy)}"
            )
        self.store.delete_dataset(tenant, dataset_id)
        self._collect(rec.sha256)

    def _collect(self, sha256: str) -> None:
        """Remove a dataset file once no record and no unfinished job refers to it."""
        if not self.store.sha256_in_use(sha256):
            with contextlib.suppress(FileNotFoundError):
                self.layout.dataset_file(sha256).unlink()
            try:
                self.files.forget_dataset(sha256)
            except Unavailable as e:  # the record is gone; the copy left is only space
                log.warning("dataset %s stays in object storage: %s", sha256, e)
