"""Dataset ingest: a streamed upload becomes a content-addressed, checked JSONL file.

Bytes are written to a temporary file under ``DATA/tmp`` while they are hashed
and counted; past the size limit, on a cut-off stream, or on a file that fails
the structural check, the temporary file is removed and nothing is recorded.
Only a complete, valid upload is renamed to ``DATA/datasets/<sha256>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from trainer.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from trainer.layout import Layout, fsync_dir
from trainer.names import check_name
from trainer.store import DatasetRecord, Store, new_id

MAX_ERRORS_LISTED = 10
MAX_LINE_BYTES = 4 << 20
ROLES = ("system", "user", "assistant")
FORMATS = {
    "messages": frozenset({"messages"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
    "text": frozenset({"text"}),
}


def _row_problem(obj: Any, fmt: str) -> str | None:
    """What is wrong with one parsed example of format ``fmt``, or None."""
    if fmt == "text":
        return (
            None
            if isinstance(obj["text"], str) and obj["text"]
            else "'text' must be a non-empty string"
        )
    if fmt == "prompt_completion":
        for k in ("prompt", "completion"):
            if not isinstance(obj[k], str) or not obj[k]:
                return f"'{k}' must be a non-empty string"
        return None
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{i}] must be an object"
        if m.get("role") not in ROLES:
            return f"messages[{i}].role must be one of {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str) or not m["content"]:
            return f"messages[{i}].content must be a non-empty string"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant message: nothing to learn from"
    return None


def check_jsonl(path: Path) -> tuple[str, int]:
    """Detect the format of a JSONL dataset and check every line; return (format, rows).

    Raises ``InvalidArgument`` listing the first problems with their line numbers
    and the total count of bad lines.
    """
    fmt: str | None = None
    rows = 0
    errors: list[str] = []
    total_bad = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            problem: str | None = None
            if len(raw) > MAX_LINE_BYTES:
                problem = f"line is {len(raw)} bytes; at most {MAX_LINE_BYTES}"
            elif not raw.strip():
                continue
            else:
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    problem = f"not UTF-8 (byte {e.start})"
                except json.JSONDecodeError as e:
                    problem = f"not JSON ({e.msg} at column {e.colno})"
                else:
                    if not isinstance(obj, dict):
                        problem = "not a JSON object"
                    else:
                        keys = frozenset(obj)
                        found = next((n for n, k in FORMATS.items() if keys == k), None)
                        if found is None:
                            problem = (
                                f"keys {sorted(keys)} match no format: expected "
                                "{'messages'}, {'prompt', 'completion'} or {'text'}"
                            )
                        elif fmt is not None and found != fmt:
                            problem = f"format {found!r} differs from the file's {fmt!r}"
                        else:
                            fmt = found
                            problem = _row_problem(obj, found)
            if problem:
                total_bad += 1
                if len(errors) < MAX_ERRORS_LISTED:
                    errors.append(f"line {lineno}: {problem}")
            else:
                rows += 1
    if total_bad:
        more = f" (and {total_bad - len(errors)} more)" if total_bad > len(errors) else ""
        raise InvalidArgument("dataset", f"{total_bad} bad line(s): " + "; ".join(errors) + more)
    if rows == 0 or fmt is None:
        raise InvalidArgument("dataset", "the file holds no examples")
    return fmt, rows


class DatasetIngest:
    """Receives uploads and manages the tenant's dataset records and files."""

    def __init__(self, store: Store, layout: Layout, max_bytes: int) -> None:
        self.store = store
        self.layout = layout
        self.max_bytes = max_bytes

    async def upload(
        self,
        tenant: str,
        name: str,
        chunks: AsyncIterator[bytes],
        size_bytes: int | None = None,
        sha256: str | None = None,
    ) -> DatasetRecord:
        check_name(name, "header.name")
        if size_bytes is not None and size_bytes > self.max_bytes:
            raise ResourceExhausted(
                f"header.size_bytes: {size_bytes} bytes exceeds the limit of {self.max_bytes}"
            )
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
            fmt, rows = await asyncio.to_thread(check_jsonl, tmp)
            final = self.layout.dataset_file(hexdigest)
            os.replace(tmp, final)  # same content under the same name: replacing is harmless
            fsync_dir(final.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        rec = DatasetRecord(
            id=new_id("ds"),
            tenant=tenant,
            name=name,
            sha256=hexdigest,
            size_bytes=size,
            num_rows=rows,
            format=fmt,
            created_at=time.time(),
        )
        try:
            self.store.add_dataset(rec)
        except AlreadyExists:  # a concurrent upload took the name
            self._collect(hexdigest)
            raise
        return rec

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
            if j.dataset_id == dataset_id and not j.state.terminal
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
