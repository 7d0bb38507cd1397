"""The job store on PostgreSQL: ``SqliteStore``'s behaviour for workers on many hosts.

The same tables and the same answers as ``trainer.service.store.SqliteStore``, on a
psycopg 3 connection pool. What SQLite gets from its one write lock, PostgreSQL gets
from row locks and advisory transaction locks, so nothing here serialises the whole
database:

- ``claim_next`` is one ``UPDATE``: the fair choice (the head of each tenant's queue; the
  tenant whose latest job started longest ago, or never, first) is made in SQL, and the
  row is taken ``FOR UPDATE SKIP LOCKED`` in a subquery, so workers never claim a job
  twice and never wait on each other. A tenant whose head another worker is claiming
  is skipped, so concurrent claims spread over tenants too.
- ``add_job``'s name checks and insert, and ``append_event``'s numbering, each hold a
  transaction-scoped advisory lock (on the tenant, on the job), released at commit.
- Leases (issue 23), PostgreSQL only for now: a claim made with ``lease_s`` holds the job
  until ``lease_until``; ``renew_lease`` extends it (the worker's heartbeat). A later
  claim re-takes a VALIDATING or RUNNING job whose lease has expired, and every claim
  adds one to ``attempt``, the fencing number: ``renew_lease`` and ``update_job_fenced``
  write only while the attempt they carry is still the job's, so a worker that was
  paused past its lease cannot touch a job that another worker has taken since.
  Without ``lease_s`` (the ``Store`` protocol's ``claim_next()``) a claim never expires,
  as in SQLite.

Times the store stamps itself (a claim's ``started_at``, leases, events) come from the
database's clock, one clock for every host. A full disk (SQLSTATE 53100) is
``StorageFull``; a server that cannot be reached, or a connection lost mid-call, is
``StoreUnavailable``, and the pool reconnects by itself once the server is back.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from trainer.errors import AlreadyExists, StorageFull, Unavailable
from trainer.names import fold
from trainer.service.store import (
    AdapterRecord,
    DatasetRecord,
    ErrorKind,
    EventLog,
    EventRecord,
    JobKind,
    JobRecord,
    JobState,
)

log = logging.getLogger(__name__)


class StoreUnavailable(Unavailable):
    """PostgreSQL cannot be reached, or the connection was lost during the call (a write
    in flight may or may not have been committed). Worth retrying later: the gRPC edge
    answers UNAVAILABLE with this reason."""


# Byte order ("C"), as SQLite compares and sorts text, whatever the database's locale.
_T = 'TEXT COLLATE "C"'
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS datasets (
    id {_T} PRIMARY KEY, tenant {_T} NOT NULL, name {_T} NOT NULL, name_fold {_T} NOT NULL,
    sha256 {_T} NOT NULL, size_bytes BIGINT NOT NULL, num_rows BIGINT NOT NULL,
    format {_T} NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    file_type {_T} NOT NULL DEFAULT 'jsonl', request_id {_T} NOT NULL DEFAULT '',
    UNIQUE (tenant, name_fold));
CREATE UNIQUE INDEX IF NOT EXISTS datasets_by_request ON datasets (tenant, request_id)
    WHERE request_id != '';
CREATE TABLE IF NOT EXISTS jobs (
    id {_T} PRIMARY KEY, tenant {_T} NOT NULL, base_model {_T} NOT NULL,
    dataset_id {_T} NOT NULL, dataset_sha256 {_T} NOT NULL, adapter_name {_T} NOT NULL,
    config JSONB NOT NULL, state {_T} NOT NULL, error_kind {_T} NOT NULL DEFAULT '',
    error_message {_T} NOT NULL DEFAULT '', progress JSONB,
    adapter_version {_T} NOT NULL DEFAULT '', metrics JSONB, pid BIGINT,
    validation_dataset_id {_T} NOT NULL DEFAULT '', validation_sha256 {_T} NOT NULL DEFAULT '',
    eval_fraction DOUBLE PRECISION NOT NULL DEFAULT 0, report JSONB,
    created_at DOUBLE PRECISION NOT NULL, started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION, kind {_T} NOT NULL DEFAULT 'FINE_TUNE',
    request_id {_T} NOT NULL DEFAULT '', export_size_bytes BIGINT NOT NULL DEFAULT 0,
    attempt BIGINT NOT NULL DEFAULT 0, worker {_T} NOT NULL DEFAULT '',
    lease_until DOUBLE PRECISION);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_last_start ON jobs (tenant, started_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_request ON jobs (tenant, request_id)
    WHERE request_id != '';
CREATE TABLE IF NOT EXISTS events (
    job_id {_T} NOT NULL, seq BIGINT NOT NULL, time DOUBLE PRECISION NOT NULL,
    state {_T} NOT NULL, message {_T} NOT NULL, progress JSONB, PRIMARY KEY (job_id, seq));
CREATE TABLE IF NOT EXISTS adapters (
    tenant {_T} NOT NULL, name {_T} NOT NULL, version {_T} NOT NULL, job_id {_T} NOT NULL,
    base_model {_T} NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant, name, version));
"""

_JSON_FIELDS = {"config", "progress", "metrics", "report"}
_JOB_FIELDS = [f.name for f in fields(JobRecord)]
_NOW = "extract(epoch FROM now())::float8"  # the statement's start
_CLOCK = "extract(epoch FROM clock_timestamp())::float8"  # the moment it is read
_HELD = (JobState.VALIDATING.value, JobState.RUNNING.value)
# A job a claim may take: queued, or held under a lease that has run out.
_CLAIMABLE = (
    "({t}.state = 'QUEUED' OR ({t}.state IN ('VALIDATING', 'RUNNING') "
    f"AND {{t}}.lease_until < {_NOW}))"
)
_CLAIM = f"""
UPDATE jobs SET state = 'VALIDATING',
    started_at = COALESCE(NULLIF(started_at, 0), {_CLOCK}),
    attempt = attempt + 1, worker = %(worker)s,
    lease_until = {_CLOCK} + %(lease_s)s::float8
WHERE id = (
    SELECT j.id FROM jobs j
    -- the head of each tenant's queue (FIFO within a tenant) ...
    WHERE j.id IN (SELECT DISTINCT ON (tenant) id FROM jobs q
                   WHERE {_CLAIMABLE.format(t="q")} ORDER BY tenant, created_at, id)
      -- ... still claimable once locked (a claim committed meanwhile fails this) ...
      AND {_CLAIMABLE.format(t="j")}
    -- ... the tenant whose latest job started longest ago (or never) first ...
    ORDER BY (SELECT COALESCE(MAX(s.started_at), 0) FROM jobs s WHERE s.tenant = j.tenant),
             j.created_at, j.id
    -- ... passing over heads that other claims hold right now: their tenants are served.
    LIMIT 1
    FOR UPDATE OF j SKIP LOCKED)
RETURNING *
"""


def _lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for ``parts`` (stable across processes)."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _value(name: str, v: Any) -> Any:
    if name in _JSON_FIELDS:
        return None if v is None else Jsonb(v)
    return getattr(v, "value", v)


def _job(r: DictRow) -> JobRecord:
    d = {k: r[k] for k in _JOB_FIELDS}
    d["state"] = JobState(d["state"])
    d["error_kind"] = ErrorKind(d["error_kind"])
    d["kind"] = JobKind(d["kind"])
    return JobRecord(**d)


def _dataset(r: DictRow) -> DatasetRecord:
    return DatasetRecord(**{k: v for k, v in r.items() if k != "name_fold"})


class PostgresStore(EventLog):
    """``Store`` on a PostgreSQL database (``dsn``: a libpq connection string or URL),
    through a pool of at most ``max_size`` connections. A call that cannot get a working
    connection within ``timeout`` seconds raises ``StoreUnavailable``."""

    def __init__(self, dsn: str, *, max_size: int = 4, timeout: float = 10.0) -> None:
        info = conninfo_to_dict(dsn)
        self._dsn = dsn
        self._timeout = timeout
        self._where = (
            f"{info.get('host') or 'localhost'}:{info.get('port') or 5432}"
            f"/{info.get('dbname') or info.get('user') or ''}"
        )
        self._pool = ConnectionPool(
            dsn,
            connection_class=psycopg.Connection[DictRow],
            kwargs={"autocommit": True, "row_factory": dict_row},
            min_size=1,
            max_size=max_size,
            timeout=timeout,
            # A pooled connection is checked before use, so the first call after a server
            # restart gets a fresh connection instead of the dead one.
            check=ConnectionPool.check_connection,
            # A failed connection attempt is retried once, then given up: the next
            # ``_getconn`` turn starts a new one (no backoff growing through an outage).
            reconnect_timeout=1.0,
            name=f"store:{self._where}",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout as e:
            self._pool.close()
            raise StoreUnavailable(self._unreachable(e)) from e
        try:
            with self._tx() as db:  # one process at a time: CREATE ... IF NOT EXISTS races
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("schema"),))
                db.execute(_SCHEMA)
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        self._pool.close()

    # ------------------------------------------------------------ connections
    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[DictRow]]:
        conn = self._getconn()
        try:
            yield conn
        except pgerrors.DiskFull as e:
            log.error("the job store is out of disk space: %s", e)
            raise StorageFull("the service is out of disk space; try again later") from e
        except psycopg.OperationalError as e:  # connection lost, shutdown, 53xxx, 57xxx
            raise StoreUnavailable(
                f"the job store (PostgreSQL at {self._where}) failed: {e}"
            ) from e
        finally:
            self._pool.putconn(conn)  # a broken one is dropped and replaced

    def _getconn(self) -> psycopg.Connection[DictRow]:
        """A checked connection, asked for in short turns until ``timeout``: each turn
        lets the pool start a new connection attempt, so a call made once the server is
        back succeeds at once instead of waiting out the pool's reconnection backoff."""
        deadline = time.monotonic() + self._timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return self._pool.getconn(timeout=max(min(left, 0.5), 0.01))
            except PoolTimeout as e:
                if left <= 0.5:
                    raise StoreUnavailable(self._unreachable(e)) from e

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[DictRow]]:
        with self._conn() as conn, conn.transaction():
            yield conn

    def _unreachable(self, e: PoolTimeout) -> str:
        """Why no connection came: the server's own refusal if one connection attempt
        shows it, else a pool whose connections were all busy."""
        try:
            psycopg.connect(self._dsn, connect_timeout=2).close()
        except psycopg.Error as why:
            reason = " ".join(str(why).split()) or repr(why)
        else:
            reason = f"all {self._pool.max_size} pooled connections stayed busy ({e})"
        return f"the job store (PostgreSQL at {self._where}) is unavailable: {reason}"

    def _rows(self, query: str, *args: Any) -> list[DictRow]:
        with self._conn() as conn:
            return conn.execute(query, args).fetchall()

    @staticmethod
    def _lock(db: psycopg.Connection[DictRow], *key: str) -> None:
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(*key),))

    # ------------------------------------------------------------ datasets
    def add_dataset(self, rec: DatasetRecord) -> DatasetRecord:
        try:
            with self._tx() as db:
                if rec.request_id:
                    self._lock(db, "dataset request", rec.tenant, rec.request_id)
                    row = db.execute(
                        "SELECT * FROM datasets WHERE tenant=%s AND request_id=%s",
                        (rec.tenant, rec.request_id),
                    ).fetchone()
                    if row is not None:
                        return _dataset(row)
                db.execute(
                    "INSERT INTO datasets (id, tenant, name, name_fold, sha256, size_bytes, "
                    "num_rows, format, created_at, file_type, request_id) "
                    "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
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
        except psycopg.IntegrityError:
            raise AlreadyExists(f"header.name: dataset {rec.name!r} exists") from None
        return rec

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetRecord | None:
        rows = self._rows("SELECT * FROM datasets WHERE tenant=%s AND id=%s", tenant, dataset_id)
        return _dataset(rows[0]) if rows else None

    def find_dataset_by_name(self, tenant: str, name: str) -> DatasetRecord | None:
        rows = self._rows(
            "SELECT * FROM datasets WHERE tenant=%s AND name_fold=%s", tenant, name.lower()
        )
        return _dataset(rows[0]) if rows else None

    def find_dataset_by_request(self, tenant: str, request_id: str) -> DatasetRecord | None:
        rows = self._rows(
            "SELECT * FROM datasets WHERE tenant=%s AND request_id=%s", tenant, request_id
        )
        return _dataset(rows[0]) if rows else None

    def list_datasets(self, tenant: str) -> list[DatasetRecord]:
        rows = self._rows(
            "SELECT * FROM datasets WHERE tenant=%s ORDER BY created_at DESC, id", tenant
        )
        return [_dataset(r) for r in rows]

    def delete_dataset(self, tenant: str, dataset_id: str) -> bool:
        with self._conn() as db:
            cur = db.execute("DELETE FROM datasets WHERE tenant=%s AND id=%s", (tenant, dataset_id))
            return cur.rowcount > 0

    def sha256_in_use(self, sha256: str) -> bool:
        """Whether any dataset record or unfinished job still needs this file."""
        active = [s.value for s in JobState if not s.terminal]
        rows = self._rows(
            "SELECT 1 FROM datasets WHERE sha256=%s UNION ALL "
            "SELECT 1 FROM jobs WHERE (dataset_sha256=%s OR validation_sha256=%s) "
            "AND state = ANY(%s) LIMIT 1",
            sha256,
            sha256,
            sha256,
            active,
        )
        return bool(rows)

    # ------------------------------------------------------------ jobs
    def add_job(self, rec: JobRecord) -> JobRecord:
        with self._tx() as db:
            # One add_job (or add_adapter) per tenant at a time, in every process: what is
            # checked below still holds at the insert.
            self._lock(db, "tenant", rec.tenant)
            if rec.request_id:
                row = db.execute(
                    "SELECT * FROM jobs WHERE tenant=%s AND request_id=%s",
                    (rec.tenant, rec.request_id),
                ).fetchone()
                if row is not None:
                    return _job(row)
            if rec.kind == JobKind.FINE_TUNE:
                self._check_adapter_name(db, rec)
            db.execute(
                "INSERT INTO jobs (id, tenant, base_model, dataset_id, dataset_sha256, "
                "adapter_name, config, state, created_at, validation_dataset_id, "
                "validation_sha256, eval_fraction, kind, request_id, adapter_version) "
                "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                (
                    rec.id,
                    rec.tenant,
                    rec.base_model,
                    rec.dataset_id,
                    rec.dataset_sha256,
                    rec.adapter_name,
                    Jsonb(rec.config),
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
    def _check_adapter_name(db: psycopg.Connection[DictRow], rec: JobRecord) -> None:
        active = [st.value for st in JobState if not st.terminal]
        for r in db.execute(
            "SELECT id, adapter_name, state FROM jobs WHERE tenant=%s AND kind=%s "
            "AND state = ANY(%s)",
            (rec.tenant, JobKind.FINE_TUNE.value, active),
        ):
            if fold(r["adapter_name"]) == fold(rec.adapter_name):
                raise AlreadyExists(
                    f"adapter_name: job {r['id']} for adapter {r['adapter_name']!r} is "
                    f"{r['state']}; wait for it or cancel it"
                )
        # Served names differ by more than case: 'Secret' beside 'secret' would share a
        # folder on a case-insensitive volume.
        for r in db.execute("SELECT DISTINCT name FROM adapters WHERE tenant=%s", (rec.tenant,)):
            if fold(r["name"]) == fold(rec.adapter_name) and r["name"] != rec.adapter_name:
                raise AlreadyExists(
                    f"adapter_name: adapter {r['name']!r} exists; names must differ by more "
                    "than case"
                )

    def find_job_by_request(self, tenant: str, request_id: str) -> JobRecord | None:
        rows = self._rows(
            "SELECT * FROM jobs WHERE tenant=%s AND request_id=%s", tenant, request_id
        )
        return _job(rows[0]) if rows else None

    def claim_next(self, worker: str = "", lease_s: float | None = None) -> JobRecord | None:
        """Take the next job as VALIDATING, in one statement: a queued one, or one whose
        lease has run out. ``SqliteStore``'s order: FIFO within a tenant; across tenants,
        the one whose latest job started longest ago (or never) first. The job keeps its
        first ``started_at``; ``attempt`` grows by one. With ``lease_s`` the claim holds
        until now + ``lease_s`` unless renewed; without, it never expires."""
        with self._conn() as db:
            row = db.execute(_CLAIM, {"worker": worker, "lease_s": lease_s}).fetchone()
        return None if row is None else _job(row)

    def renew_lease(self, job_id: str, attempt: int, lease_s: float) -> bool:
        """Extend the lease of ``attempt`` to now + ``lease_s`` (a heartbeat). False when
        the job is no longer that attempt's to run: re-claimed since, or ended."""
        with self._conn() as db:
            cur = db.execute(
                f"UPDATE jobs SET lease_until = {_CLOCK} + %s::float8 "
                "WHERE id=%s AND attempt=%s AND state = ANY(%s)",
                (lease_s, job_id, attempt, list(_HELD)),
            )
            return cur.rowcount == 1

    def get_job(self, tenant: str | None, job_id: str) -> JobRecord | None:
        if tenant is None:
            rows = self._rows("SELECT * FROM jobs WHERE id=%s", job_id)
        else:
            rows = self._rows("SELECT * FROM jobs WHERE tenant=%s AND id=%s", tenant, job_id)
        return _job(rows[0]) if rows else None

    def list_jobs(
        self, tenant: str, states: tuple[JobState, ...] = (), adapter_name: str | None = None
    ) -> list[JobRecord]:
        where: list[str] = ["tenant=%s"]
        args: list[Any] = [tenant]
        if states:
            where.append("state = ANY(%s)")
            args.append([s.value for s in states])
        if adapter_name is not None:
            where.append("adapter_name=%s")
            args.append(adapter_name)
        rows = self._rows(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at DESC, id", *args
        )
        return [_job(r) for r in rows]

    def jobs_in_states(self, *states: JobState) -> list[JobRecord]:
        rows = self._rows(
            "SELECT * FROM jobs WHERE state = ANY(%s) ORDER BY created_at, id",
            [s.value for s in states],
        )
        return [_job(r) for r in rows]

    def update_job(self, job_id: str, **fields: Any) -> None:
        self._update(job_id, None, fields)

    def update_job_fenced(self, job_id: str, fence: int, **fields: Any) -> bool:
        """``update_job`` that writes only while ``fence`` is still the job's attempt; False
        (nothing written) once another claim has taken the job."""
        return self._update(job_id, fence, fields)

    def _update(self, job_id: str, attempt: int | None, fields: dict[str, Any]) -> bool:
        sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in fields)
        query = sql.SQL("UPDATE jobs SET {} WHERE id = %s").format(sets)
        args = [_value(k, v) for k, v in fields.items()] + [job_id]
        if attempt is not None:
            query += sql.SQL(" AND attempt = %s")
            args.append(attempt)
        with self._conn() as db:
            return db.execute(query, args).rowcount == 1

    # ------------------------------------------------------------ events
    def _append(
        self,
        job_id: str,
        attempt: int | None,
        state: JobState,
        message: str,
        progress: dict | None,
    ) -> EventRecord | None:
        with self._tx() as db:
            if attempt is not None:
                # FOR SHARE: a claim's UPDATE of the job waits for this event to be stored.
                held = db.execute(
                    "SELECT attempt FROM jobs WHERE id=%s FOR SHARE", (job_id,)
                ).fetchone()
                if held is None or held["attempt"] != attempt:
                    return None
            self._lock(db, "events", job_id)  # numbered one after another, whoever appends
            row = db.execute(
                "INSERT INTO events (job_id, seq, time, state, message, progress) "
                "SELECT %s, COALESCE(MAX(seq), 0) + 1, "
                f"{_CLOCK}, %s, %s, %s "
                "FROM events WHERE job_id=%s RETURNING seq, time",
                (job_id, state.value, message, _value("progress", progress), job_id),
            ).fetchone()
        assert row is not None
        return self._deliver(EventRecord(job_id, row["seq"], row["time"], state, message, progress))

    def events_after(self, job_id: str, seq: int) -> list[EventRecord]:
        rows = self._rows(
            "SELECT * FROM events WHERE job_id=%s AND seq>%s ORDER BY seq", job_id, seq
        )
        return [
            EventRecord(
                r["job_id"], r["seq"], r["time"], JobState(r["state"]), r["message"], r["progress"]
            )
            for r in rows
        ]

    # ------------------------------------------------------------ adapters
    def add_adapter(self, rec: AdapterRecord) -> None:
        with self._tx() as db:
            self._lock(db, "tenant", rec.tenant)  # add_job's case check sees it or not, whole
            db.execute(
                "INSERT INTO adapters VALUES (%s,%s,%s,%s,%s,%s) "
                "ON CONFLICT (tenant, name, version) DO UPDATE SET job_id=EXCLUDED.job_id, "
                "base_model=EXCLUDED.base_model, created_at=EXCLUDED.created_at",
                (rec.tenant, rec.name, rec.version, rec.job_id, rec.base_model, rec.created_at),
            )

    def list_adapters(self, tenant: str) -> list[AdapterRecord]:
        """The newest version of each of the tenant's adapter names."""
        rows = self._rows(
            "SELECT DISTINCT ON (name) * FROM adapters WHERE tenant=%s ORDER BY name, version DESC",
            tenant,
        )
        return [AdapterRecord(**r) for r in rows]

    def list_adapter_versions(self, tenant: str, name: str) -> list[AdapterRecord]:
        rows = self._rows(
            "SELECT * FROM adapters WHERE tenant=%s AND name=%s ORDER BY version DESC",
            tenant,
            name,
        )
        return [AdapterRecord(**r) for r in rows]

    def delete_adapter(self, tenant: str, name: str) -> bool:
        with self._conn() as db:
            cur = db.execute("DELETE FROM adapters WHERE tenant=%s AND name=%s", (tenant, name))
            return cur.rowcount > 0

    def delete_adapter_version(self, tenant: str, name: str, version: str) -> bool:
        with self._conn() as db:
            cur = db.execute(
                "DELETE FROM adapters WHERE tenant=%s AND name=%s AND version=%s",
                (tenant, name, version),
            )
            return cur.rowcount > 0
