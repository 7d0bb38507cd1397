"""The job store: datasets, jobs, their events and published adapters, in SQLite (WAL).

``SqliteStore`` behind the ``Store`` protocol is the embedded default for one host;
``trainer.service.pgstore.PostgresStore`` is the same on PostgreSQL (claims with
``FOR UPDATE SKIP LOCKED``) for several, chosen by ``--job-store``. What must hold
across processes is the store's to keep, each in one transaction: an adapter name has
one active job (``add_job``), and the next job is claimed fairly (``claim_next``).
Every query is scoped by tenant where the object has one, so a caller cannot
reach another tenant's rows by id. A full disk is ``StorageFull``, whatever the engine.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from trainer.errors import AlreadyExists, StorageFull
from trainer.names import fold

log = logging.getLogger(__name__)


class JobState(StrEnum):
    QUEUED = "QUEUED"
    VALIDATING = "VALIDATING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)

    @property
    def active(self) -> bool:
        return self in (JobState.VALIDATING, JobState.RUNNING)


class JobKind(StrEnum):
    FINE_TUNE = "FINE_TUNE"  # QLoRA on a dataset, published as an adapter version
    MERGE_EXPORT = "MERGE_EXPORT"  # a version merged into the bf16 base (trainer.training.export)


class ErrorKind(StrEnum):
    NONE = ""
    USER = "USER"
    SYSTEM = "SYSTEM"


@dataclass
class DatasetRecord:
    id: str
    tenant: str
    name: str
    sha256: str
    size_bytes: int
    num_rows: int
    format: str
    created_at: float
    file_type: str = "jsonl"
    request_id: str = ""  # the client's, for retries (AIP-155); "" when none was given


@dataclass
class JobRecord:
    id: str
    tenant: str
    base_model: str
    dataset_id: str
    dataset_sha256: str
    adapter_name: str
    config: dict[str, Any]
    state: JobState = JobState.QUEUED
    error_kind: ErrorKind = ErrorKind.NONE
    error_message: str = ""
    progress: dict[str, Any] | None = None
    adapter_version: str = ""
    metrics: dict[str, Any] | None = None
    pid: int | None = None
    validation_dataset_id: str = ""
    validation_sha256: str = ""
    eval_fraction: float = 0.0
    report: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    kind: JobKind = JobKind.FINE_TUNE
    request_id: str = ""  # the client's, for retries (AIP-155); "" when none was given
    # MERGE_EXPORT: ``adapter_version`` is the version merged; this the export's bytes.
    export_size_bytes: int = 0
    # The claim (``Store.claim_next``): each one adds 1 to ``attempt``, the fencing number
    # that the claiming worker's writes carry; ``lease_until`` None: held until it ends.
    attempt: int = 0
    worker: str = ""
    lease_until: float | None = None


@dataclass
class EventRecord:
    job_id: str
    seq: int
    time: float
    state: JobState
    message: str
    progress: dict[str, Any] | None


@dataclass
class AdapterRecord:
    tenant: str
    name: str
    version: str
    job_id: str
    base_model: str
    created_at: float


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


# What a store hands each event it stores to (trainer.service.observe.JobObserver, in the service).
EventListener = Callable[[EventRecord], None]


class Store(Protocol):
    """What the service needs from its store: SQLite on one host (``SqliteStore``), or
    PostgreSQL shared by several (``trainer.service.pgstore.PostgresStore``)."""

    def close(self) -> None: ...

    def add_dataset(self, rec: DatasetRecord) -> DatasetRecord:
        """Store ``rec``; the record stored earlier under its ``request_id``, if any, instead
        (one transaction). A name held by another dataset is ``AlreadyExists``."""
        ...

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetRecord | None: ...
    def find_dataset_by_name(self, tenant: str, name: str) -> DatasetRecord | None: ...
    def find_dataset_by_request(self, tenant: str, request_id: str) -> DatasetRecord | None: ...
    def list_datasets(self, tenant: str) -> list[DatasetRecord]: ...
    def delete_dataset(self, tenant: str, dataset_id: str) -> bool: ...
    def sha256_in_use(self, sha256: str) -> bool: ...
    def add_job(self, rec: JobRecord) -> JobRecord:
        """Queue ``rec`` and return it; or the job stored earlier under its ``request_id``,
        if any. A FINE_TUNE job is refused (``AlreadyExists``) while another FINE_TUNE job
        for the same adapter name (case folded) is active, or if the tenant has an adapter
        of that name in another case: checked and inserted in one transaction."""
        ...

    def find_job_by_request(self, tenant: str, request_id: str) -> JobRecord | None: ...

    def claim_next(self, worker: str = "", lease_s: float | None = None) -> JobRecord | None:
        """Take the next job, in one transaction, as VALIDATING: a queued one, or one held
        under a lease that has run out (its worker died or stopped). FIFO within a tenant;
        across tenants, the one whose latest job started longest ago (or never) first. Its
        ``started_at`` is its first start (a resumed job keeps its own); ``attempt`` grows
        by one; with ``lease_s`` the claim lapses unless renewed within that time."""
        ...

    def renew_lease(self, job_id: str, attempt: int, lease_s: float) -> bool:
        """Extend ``attempt``'s lease to now + ``lease_s`` (a heartbeat); False when the job
        is not that attempt's any more (claimed again since, cancelled, ended)."""
        ...

    def update_job_fenced(self, job_id: str, fence: int, **fields: Any) -> bool:
        """``update_job`` only while ``fence`` is the job's attempt; False (nothing written)
        once another claim (or a cancel) has taken the job from that attempt. ``fields`` may
        set ``attempt`` itself (a cancel fences the running worker off that way)."""
        ...

    def append_event_fenced(
        self,
        job_id: str,
        attempt: int,
        state: JobState,
        message: str,
        progress: dict | None = None,
    ) -> EventRecord | None:
        """``append_event`` only while ``attempt`` is the job's; None (nothing stored)
        otherwise."""
        ...

    def get_job(self, tenant: str | None, job_id: str) -> JobRecord | None: ...
    def list_jobs(
        self, tenant: str, states: tuple[JobState, ...] = (), adapter_name: str | None = None
    ) -> list[JobRecord]:
        """The tenant's jobs, newest first: those in any of ``states`` (all if empty), for
        ``adapter_name`` (any if None)."""
        ...

    def jobs_in_states(self, *states: JobState) -> list[JobRecord]: ...
    def update_job(self, job_id: str, **fields: Any) -> None: ...
    def append_event(
        self, job_id: str, state: JobState, message: str, progress: dict | None = None
    ) -> EventRecord:
        """Store a job's event, then hand it to the listener, if one was given."""
        ...

    def listen(self, listener: EventListener) -> None:
        """Hand every event stored from now on to ``listener`` (its errors are logged)."""
        ...

    def events_after(self, job_id: str, seq: int) -> list[EventRecord]: ...
    def add_adapter(self, rec: AdapterRecord) -> None: ...
    def list_adapters(self, tenant: str) -> list[AdapterRecord]: ...
    def list_adapter_versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        """Every version of one adapter, newest first."""
        ...

    def delete_adapter(self, tenant: str, name: str) -> bool: ...
    def delete_adapter_version(self, tenant: str, name: str, version: str) -> bool: ...


class EventLog:
    """What both stores do alike around one event: the plain and the fenced append, and
    handing each stored event to the listener. A store implements ``_append``."""

    _on_event: EventListener | None = None

    def listen(self, listener: EventListener) -> None:
        self._on_event = listener

    def append_event(
        self, job_id: str, state: JobState, message: str, progress: dict | None = None
    ) -> EventRecord:
        ev = self._append(job_id, None, state, message, progress)
        assert ev is not None  # only a fenced append is refused
        return ev

    def append_event_fenced(
        self,
        job_id: str,
        attempt: int,
        state: JobState,
        message: str,
        progress: dict | None = None,
    ) -> EventRecord | None:
        return self._append(job_id, attempt, state, message, progress)

    def _append(
        self,
        job_id: str,
        attempt: int | None,
        state: JobState,
        message: str,
        progress: dict | None,
    ) -> EventRecord | None:
        """Store the event (only while the job's attempt is ``attempt``, unless None) and
        return it after ``_deliver``; None when fenced off."""
        raise NotImplementedError

    def _deliver(self, ev: EventRecord) -> EventRecord:
        if self._on_event is not None:
            try:
                self._on_event(ev)
            except Exception:  # observing never breaks a job
                log.exception("observing an event of job %s failed", ev.job_id)
        return ev


_SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, name_fold TEXT NOT NULL,
    sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL, num_rows INTEGER NOT NULL,
    format TEXT NOT NULL, created_at REAL NOT NULL,
    UNIQUE (tenant, name_fold));
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, base_model TEXT NOT NULL,
    dataset_id TEXT NOT NULL, dataset_sha256 TEXT NOT NULL, adapter_name TEXT NOT NULL,
    config TEXT NOT NULL, state TEXT NOT NULL, error_kind TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '', progress TEXT, adapter_version TEXT NOT NULL DEFAULT '',
    metrics TEXT, pid INTEGER, created_at REAL NOT NULL, started_at REAL, finished_at REAL);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL, seq INTEGER NOT NULL, time REAL NOT NULL, state TEXT NOT NULL,
    message TEXT NOT NULL, progress TEXT, PRIMARY KEY (job_id, seq));
CREATE TABLE IF NOT EXISTS adapters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL, job_id TEXT NOT NULL,
    base_model TEXT NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (tenant, name, version));
"""

# Columns added after the first release: (table, column, definition), added when missing.
_MIGRATIONS = (
    ("datasets", "file_type", "TEXT NOT NULL DEFAULT 'jsonl'"),
    ("jobs", "validation_dataset_id", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "validation_sha256", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "eval_fraction", "REAL NOT NULL DEFAULT 0"),
    ("jobs", "report", "TEXT"),
    ("datasets", "request_id", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "kind", "TEXT NOT NULL DEFAULT 'FINE_TUNE'"),
    ("jobs", "request_id", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "export_size_bytes", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "attempt", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "worker", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "lease_until", "REAL"),
)

# Made after the migrations, on the columns they add.
_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS datasets_by_request ON datasets (tenant, request_id)
    WHERE request_id != '';
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_request ON jobs (tenant, request_id)
    WHERE request_id != '';
"""

_JSON_FIELDS = {"config", "progress", "metrics", "report"}
_HELD = (JobState.VALIDATING.value, JobState.RUNNING.value)


@contextmanager
def _full_is_storage_full() -> Iterator[None]:
    """SQLite's "database or disk is full" as the domain's ``StorageFull``."""
    try:
        yield
    except sqlite3.Error as e:
        if getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            log.error("the job store is out of disk space: %s", e)
            raise StorageFull("the service is out of disk space; try again later") from e
        raise


def _dumps(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


class SqliteStore(EventLog):
    """``Store`` on one SQLite file in WAL mode (readers never block the writer). Writes
    take SQLite's write lock for their whole transaction (``BEGIN IMMEDIATE``), so what
    one checks and writes holds for every process on the file."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        for table, column, definition in _MIGRATIONS:
            have = {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        self._db.executescript(_INDEXES)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, _full_is_storage_full():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:  # SQLite rolls back by itself on some errors
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock, _full_is_storage_full():
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------ datasets
    @staticmethod
    def _dataset(r: sqlite3.Row) -> DatasetRecord:
        return DatasetRecord(
            id=r["id"],
            tenant=r["tenant"],
            name=r["name"],
            sha256=r["sha256"],
            size_bytes=r["size_bytes"],
            num_rows=r["num_rows"],
            format=r["format"],
            created_at=r["created_at"],
            file_type=r["file_type"],
            request_id=r["request_id"],
        )

    def add_dataset(self, rec: DatasetRecord) -> DatasetRecord:
        try:
            with self._tx() as db:
                if rec.request_id:
                    rows = db.execute(
                        "SELECT * FROM datasets WHERE tenant=? AND request_id=?",
                        (rec.tenant, rec.request_id),
                    ).fetchall()
                    if rows:
                        return self._dataset(rows[0])
                db.execute(
                    "INSERT INTO datasets (id, tenant, name, name_fold, sha256, size_bytes, "
                    "num_rows, format, created_at, file_type, request_id) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        rec.id,
                        rec.tenant,
                        rec.name,
                        rec.name.lower(),
                        rec.sha256,
                        rec.size_bytes,
                        rec.num_rows,
                        rec.format,
                        rec.created_at,
                        rec.file_type,
                        rec.request_id,
                    ),
                )
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"header.name: dataset {rec.name!r} exists") from None
        return rec

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetRecord | None:
        rows = self._rows("SELECT * FROM datasets WHERE tenant=? AND id=?", tenant, dataset_id)
        return self._dataset(rows[0]) if rows else None

    def find_dataset_by_name(self, tenant: str, name: str) -> DatasetRecord | None:
        rows = self._rows(
            "SELECT * FROM datasets WHERE tenant=? AND name_fold=?", tenant, name.lower()
        )
        return self._dataset(rows[0]) if rows else None

    def find_dataset_by_request(self, tenant: str, request_id: str) -> DatasetRecord | None:
        rows = self._rows(
            "SELECT * FROM datasets WHERE tenant=? AND request_id=?", tenant, request_id
        )
        return self._dataset(rows[0]) if rows else None

    def list_datasets(self, tenant: str) -> list[DatasetRecord]:
        rows = self._rows(
            "SELECT * FROM datasets WHERE tenant=? ORDER BY created_at DESC, id", tenant
        )
        return [self._dataset(r) for r in rows]

    def delete_dataset(self, tenant: str, dataset_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM datasets WHERE tenant=? AND id=?", (tenant, dataset_id))
            return cur.rowcount > 0

    def sha256_in_use(self, sha256: str) -> bool:
        """Whether any dataset record or unfinished job still needs this file."""
        active = [s.value for s in JobState if not s.terminal]
        marks = ",".join("?" * len(active))
        rows = self._rows(
            f"SELECT 1 FROM datasets WHERE sha256=? UNION ALL "
            f"SELECT 1 FROM jobs WHERE (dataset_sha256=? OR validation_sha256=?) "
            f"AND state IN ({marks}) LIMIT 1",
            sha256,
            sha256,
            sha256,
            *active,
        )
        return bool(rows)

    # ------------------------------------------------------------ jobs
    @staticmethod
    def _job(r: sqlite3.Row) -> JobRecord:
        d = dict(r)
        for k in _JSON_FIELDS:
            d[k] = json.loads(d[k]) if d[k] is not None else None
        d["state"] = JobState(d["state"])
        d["error_kind"] = ErrorKind(d["error_kind"])
        d["kind"] = JobKind(d["kind"])
        return JobRecord(**d)

    def add_job(self, rec: JobRecord) -> JobRecord:
        with self._tx() as db:
            if rec.request_id:
                rows = db.execute(
                    "SELECT * FROM jobs WHERE tenant=? AND request_id=?",
                    (rec.tenant, rec.request_id),
                ).fetchall()
                if rows:
                    return self._job(rows[0])
            if rec.kind == JobKind.FINE_TUNE:
                self._check_adapter_name(db, rec)
            db.execute(
                "INSERT INTO jobs (id, tenant, base_model, dataset_id, dataset_sha256, "
                "adapter_name, config, state, created_at, validation_dataset_id, "
                "validation_sha256, eval_fraction, kind, request_id, adapter_version) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.id,
                    rec.tenant,
                    rec.base_model,
                    rec.dataset_id,
                    rec.dataset_sha256,
                    rec.adapter_name,
                    json.dumps(rec.config),
                    rec.state.value,
                    rec.created_at,
                    rec.validation_dataset_id,
                    rec.validation_sha256,
                    rec.eval_fraction,
                    rec.kind.value,
                    rec.request_id,
                    rec.adapter_version,
                ),
            )
        return rec

    @staticmethod
    def _check_adapter_name(db: sqlite3.Connection, rec: JobRecord) -> None:
        active = [st.value for st in JobState if not st.terminal]
        marks = ",".join("?" * len(active))
        for job_id, name, state in db.execute(
            f"SELECT id, adapter_name, state FROM jobs WHERE tenant=? AND kind=? "
            f"AND state IN ({marks})",
            (rec.tenant, JobKind.FINE_TUNE.value, *active),
        ):
            if fold(name) == fold(rec.adapter_name):
                raise AlreadyExists(
                    f"adapter_name: job {job_id} for adapter {name!r} is {state}; "
                    "wait for it or cancel it"
                )
        # Served names differ by more than case: 'Secret' beside 'secret' would share a
        # folder on a case-insensitive volume.
        for (name,) in db.execute(
            "SELECT DISTINCT name FROM adapters WHERE tenant=?", (rec.tenant,)
        ):
            if fold(name) == fold(rec.adapter_name) and name != rec.adapter_name:
                raise AlreadyExists(
                    f"adapter_name: adapter {name!r} exists; names must differ by more than case"
                )

    def find_job_by_request(self, tenant: str, request_id: str) -> JobRecord | None:
        rows = self._rows("SELECT * FROM jobs WHERE tenant=? AND request_id=?", tenant, request_id)
        return self._job(rows[0]) if rows else None

    def claim_next(self, worker: str = "", lease_s: float | None = None) -> JobRecord | None:
        now = time.time()
        # Queued, or held under a lease that has run out.
        claimable = "(state=? OR (state IN (?,?) AND lease_until < ?))"
        args = (JobState.QUEUED.value, JobState.VALIDATING.value, JobState.RUNNING.value, now)
        with self._tx() as db:
            rows = db.execute(
                f"SELECT * FROM jobs WHERE {claimable} ORDER BY created_at, id", args
            ).fetchall()
            if not rows:
                return None
            last_start = dict(
                db.execute(
                    "SELECT tenant, MAX(started_at) FROM jobs WHERE started_at IS NOT NULL "
                    f"AND tenant IN (SELECT tenant FROM jobs WHERE {claimable}) GROUP BY tenant",
                    args,
                ).fetchall()
            )
            first_of_tenant: dict[str, sqlite3.Row] = {}
            for r in rows:  # oldest first
                first_of_tenant.setdefault(r["tenant"], r)
            row = min(
                first_of_tenant.values(),
                key=lambda r: (last_start.get(r["tenant"], 0.0), r["created_at"]),
            )
            job = self._job(row)
            job.state = JobState.VALIDATING
            job.started_at = job.started_at or now
            job.attempt += 1
            job.worker = worker
            job.lease_until = None if lease_s is None else now + lease_s
            db.execute(
                "UPDATE jobs SET state=?, started_at=?, attempt=?, worker=?, lease_until=? "
                "WHERE id=?",
                (job.state.value, job.started_at, job.attempt, worker, job.lease_until, job.id),
            )
        return job

    def renew_lease(self, job_id: str, attempt: int, lease_s: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_until=? WHERE id=? AND attempt=? AND state IN (?,?)",
                (time.time() + lease_s, job_id, attempt, *_HELD),
            )
            return cur.rowcount == 1

    def get_job(self, tenant: str | None, job_id: str) -> JobRecord | None:
        if tenant is None:
            rows = self._rows("SELECT * FROM jobs WHERE id=?", job_id)
        else:
            rows = self._rows("SELECT * FROM jobs WHERE tenant=? AND id=?", tenant, job_id)
        return self._job(rows[0]) if rows else None

    def list_jobs(
        self, tenant: str, states: tuple[JobState, ...] = (), adapter_name: str | None = None
    ) -> list[JobRecord]:
        where, args = ["tenant=?"], [tenant]
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += [s.value for s in states]
        if adapter_name is not None:
            where.append("adapter_name=?")
            args.append(adapter_name)
        rows = self._rows(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at DESC, id", *args
        )
        return [self._job(r) for r in rows]

    def jobs_in_states(self, *states: JobState) -> list[JobRecord]:
        marks = ",".join("?" * len(states))
        rows = self._rows(
            f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY created_at, id",
            *(s.value for s in states),
        )
        return [self._job(r) for r in rows]

    def update_job(self, job_id: str, **fields: Any) -> None:
        self._update(job_id, None, fields)

    def update_job_fenced(self, job_id: str, fence: int, **fields: Any) -> bool:
        return self._update(job_id, fence, fields)

    def _update(self, job_id: str, fence: int | None, fields: dict[str, Any]) -> bool:
        cols, vals = [], []
        for k, v in fields.items():
            cols.append(f"{k}=?")
            vals.append(_dumps(v) if k in _JSON_FIELDS else getattr(v, "value", v))
        where, args = ("", ()) if fence is None else (" AND attempt=?", (fence,))
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE jobs SET {', '.join(cols)} WHERE id=?{where}", (*vals, job_id, *args)
            )
            return cur.rowcount == 1

    # ------------------------------------------------------------ events
    def _append(
        self,
        job_id: str,
        attempt: int | None,
        state: JobState,
        message: str,
        progress: dict | None,
    ) -> EventRecord | None:
        now = time.time()
        with self._tx() as db:
            if attempt is not None:
                row = db.execute("SELECT attempt FROM jobs WHERE id=?", (job_id,)).fetchone()
                if row is None or row[0] != attempt:
                    return None
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id=?", (job_id,)
            ).fetchone()
            db.execute(
                "INSERT INTO events VALUES (?,?,?,?,?,?)",
                (job_id, seq, now, state.value, message, _dumps(progress)),
            )
        return self._deliver(EventRecord(job_id, seq, now, state, message, progress))

    def events_after(self, job_id: str, seq: int) -> list[EventRecord]:
        rows = self._rows("SELECT * FROM events WHERE job_id=? AND seq>? ORDER BY seq", job_id, seq)
        return [
            EventRecord(
                r["job_id"],
                r["seq"],
                r["time"],
                JobState(r["state"]),
                r["message"],
                json.loads(r["progress"]) if r["progress"] else None,
            )
            for r in rows
        ]

    # ------------------------------------------------------------ adapters
    def add_adapter(self, rec: AdapterRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO adapters VALUES (?,?,?,?,?,?)",
                (rec.tenant, rec.name, rec.version, rec.job_id, rec.base_model, rec.created_at),
            )

    def list_adapters(self, tenant: str) -> list[AdapterRecord]:
        """The newest version of each of the tenant's adapter names."""
        rows = self._rows(
            "SELECT * FROM adapters a WHERE tenant=? AND version = "
            "(SELECT version FROM adapters b WHERE b.tenant=a.tenant AND b.name=a.name "
            "ORDER BY LENGTH(version) DESC, version DESC LIMIT 1) "  # by number: v10000 last
            "ORDER BY name",
            tenant,
        )
        return [AdapterRecord(**dict(r)) for r in rows]

    def list_adapter_versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        rows = self._rows(
            "SELECT * FROM adapters WHERE tenant=? AND name=? "
            "ORDER BY LENGTH(version) DESC, version DESC",
            tenant,
            name,
        )
        return [AdapterRecord(**dict(r)) for r in rows]

    def delete_adapter(self, tenant: str, name: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM adapters WHERE tenant=? AND name=?", (tenant, name))
            return cur.rowcount > 0

    def delete_adapter_version(self, tenant: str, name: str, version: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM adapters WHERE tenant=? AND name=? AND version=?",
                (tenant, name, version),
            )
            return cur.rowcount > 0
