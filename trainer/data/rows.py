"""A job's tokenized rows on disk: an Arrow stream file that ``datasets`` memory-maps.

The report tokenizes every example once (``trainer.data.report``); the rows go straight to
this file in batches, so a job's host memory does not grow with its dataset (a million
examples as Python lists of ints would take gigabytes), and TRL reads them from it.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import pyarrow as pa

from trainer.data.tokens import Tokens

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
BATCH_ROWS = 1024


class RowFile:
    """Append ``Tokens`` rows; ``close`` (or leaving the ``with``) finishes the file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, SCHEMA)
        self._ids: list[list[int]] = []
        self._labels: list[list[int]] = []
        self.rows = 0

    def add(self, t: Tokens) -> None:
        self._ids.append(t.input_ids)
        self._labels.append(t.labels)
        self.rows += 1
        if len(self._ids) >= BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._ids:
            batch = pa.record_batch(
                [
                    pa.array(self._ids, SCHEMA.field(0).type),
                    pa.array(self._labels, SCHEMA.field(1).type),
                ],
                schema=SCHEMA,
            )
            self._writer.write_batch(batch)
            self._ids, self._labels = [], []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        self._sink.close()

    def __enter__(self) -> RowFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def dataset(self):  # -> datasets.Dataset (imported late: the upload path needs no torch)
        """The finished file as a memory-mapped ``datasets.Dataset``."""
        from datasets import Dataset

        return Dataset.from_file(str(self.path))


def rows_dataset(rows: list[Tokens]):  # -> datasets.Dataset
    """Rows held in memory as the same dataset (tests and small inputs)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]}
    )
