"""The service on PostgreSQL (``--job-store postgresql://...``): the same calls as on
SQLite, records that outlive the service, and a store that goes away and comes back
answered UNAVAILABLE with the reason, then served again without an operator. A real
PostgreSQL server (tests/postgres.py) and the real service process; no mocks."""

from __future__ import annotations

import grpc
import pytest

from finetune.v1 import trainer_pb2 as pb
from tests.service import Service, add_tenant, chat_rows, write_jsonl

pytest_plugins = ["tests.postgres"]


def test_the_service_keeps_its_records_in_postgresql(tmp_path, postgres_dsn):
    data = tmp_path / "data"
    key = add_tenant(data, "acme")
    extra = ["--job-store", postgres_dsn]
    svc = Service(data, {"tiny": str(data / "no-model")}, extra=extra).start()
    try:
        with svc.client(key) as c:
            f = write_jsonl(tmp_path / "d.jsonl", chat_rows("q", "a", 12))
            ds = c.upload_dataset(f, "d", request_id="r-1")
            assert c.upload_dataset(f, "d", request_id="r-1").id == ds.id
            job = c.create_job("tiny", ds.id, "bot")
            c.cancel_job(job.id)
    finally:
        assert svc.stop() == 0, svc.log()
    assert not (data / "trainer.db").exists()  # nothing went to SQLite
    svc = Service(data, {"tiny": str(data / "no-model")}, extra=extra).start()
    try:
        with svc.client(key) as c:
            assert [d.id for d in c.list_datasets()] == [ds.id]
            (listed,) = c.list_jobs()
            assert listed.id == job.id and listed.state == pb.JOB_STATE_CANCELLED
            assert c.usage().dataset_bytes == ds.size_bytes
    finally:
        assert svc.stop() == 0, svc.log()


def test_a_store_that_goes_away_is_unavailable_then_serves_again(tmp_path):
    from tests.postgres import running_server  # a server of its own: this one is stopped

    data = tmp_path / "data"
    key = add_tenant(data, "acme")
    with running_server() as pg:
        extra = ["--job-store", pg.create_database("svc")]
        svc = Service(data, {"tiny": str(data / "no-model")}, extra=extra).start()
        try:
            with svc.client(key) as c:
                f = write_jsonl(tmp_path / "d.jsonl", chat_rows("q", "a", 12))
                ds = c.upload_dataset(f, "d")
                pg.stop()
                with pytest.raises(grpc.RpcError) as e:
                    c.list_datasets()
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "job store (PostgreSQL" in (e.value.details() or "")
                pg.start()
                assert [d.id for d in c.list_datasets()] == [ds.id]
        finally:
            assert svc.stop() == 0, svc.log()
