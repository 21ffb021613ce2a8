"""One usage row per provider call against real PostgreSQL: lost replies, a database that is away.

The faults are injected at the seam the stage uses (the statement that ends a chained
job, the sink's connection factory); the rows are read back as a user would.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from imagen import jobs
from imagen.backends.base import Usage
from imagen.broker import FINALIZE_ACTOR, SYNC_ACTOR
from imagen.config import Settings
from imagen.stages import StageContext, run_finalize, run_generate, run_sync
from imagen.store.postgres import PostgresJobStore
from imagen.usage import DatabaseSink, UsageRecord
from imagen.usage_spool import REJECTED, UsageSpool
from tests.integration.conftest import RecordingBroker
from tests.integration.rows import scalar

COUNT = "SELECT count(*) FROM imagen.usage WHERE job_id = %s"


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url, redis_url=redis_url, storage="local", storage_dir=tmp_path / "storage",
        output_dir=tmp_path / "out", usage_spool_dir=tmp_path / "spool", listener_metrics_port=0,
        mock_call_log=tmp_path / "calls.log",
    )  # fmt: skip


@pytest.fixture
def ctx(settings: Settings) -> Iterator[StageContext]:
    context = StageContext(settings, RecordingBroker())
    yield context
    context.close()


def claim_one(db_url: str) -> jobs.Claim:
    with psycopg.connect(db_url, autocommit=True) as conn:
        jobs.submit_job(conn, uuid.uuid4(), "a cat", {"backend": "mock", "size": "16x16"})
        (claim,) = jobs.claim_jobs(conn, 1)
    return claim


def calls(settings: Settings) -> list[str]:
    assert settings.mock_call_log is not None
    return [line.split()[0] for line in settings.mock_call_log.read_text().splitlines()]


def record_for(job_id: Any = None) -> UsageRecord:
    usage = Usage(backend="mock", model="mock-1", images=1, latency_ms=3.0)
    return UsageRecord.from_usage(usage, cost_usd=0.0, owner_user_id=uuid.uuid4(), job_id=job_id)


@contextmanager
def database_away() -> Iterator[None]:
    raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
    yield  # pragma: no cover


def test_chained_end_committed_but_its_reply_lost_leaves_one_usage_row(
    ctx: StageContext, db_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The statement that writes the images row, the usage row and `done` commits, then the
    # connection drops before its reply: the stage cannot tell, so it writes the row again.
    record = ctx.store.record_job_image

    def committed_then_dropped(*args: Any, **kwargs: Any) -> Any:
        record(*args, **kwargs)
        raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")

    monkeypatch.setattr(ctx.store, "record_job_image", committed_then_dropped)
    ctx.chain_for_worker(None)
    claim = claim_one(db_url)
    run_generate(ctx, str(claim.job_id), claim.attempt)
    assert scalar(db_url, "SELECT status FROM imagen.jobs WHERE id = %s", claim.job_id) == "done"
    assert scalar(db_url, COUNT, claim.job_id) == 1, "one row for one call, though it was written twice"
    (call,) = calls(settings)
    assert str(scalar(db_url, "SELECT call_id FROM imagen.usage WHERE job_id = %s", claim.job_id)) == call


def test_usage_the_database_did_not_take_is_spooled_and_written_once_when_it_is_back(
    ctx: StageContext, db_url: str, settings: Settings
) -> None:
    # Split stages write the row right after the call; here the database is away for that write.
    claim = claim_one(db_url)
    ctx.__dict__["usage_sink"] = DatabaseSink(PostgresJobStore(database_away), spool=ctx.usage_spool)
    run_generate(ctx, str(claim.job_id), claim.attempt)
    assert ctx.broker.sent == [(SYNC_ACTOR, (str(claim.job_id), 1))], "the job goes on: an image is not lost"
    assert scalar(db_url, COUNT, claim.job_id) == 0
    (spooled,) = ctx.usage_spool.pending()
    assert spooled.name == f"{calls(settings)[0]}.json"
    # Two workers of the host replay the same file: still one row.
    twin = spooled.read_bytes()
    assert ctx.store.replay_usage(ctx.usage_spool) == 1
    spooled.write_bytes(twin)
    ctx.store.replay_usage(ctx.usage_spool)
    assert ctx.usage_spool.pending() == []
    assert scalar(db_url, COUNT, claim.job_id) == 1
    assert (
        str(scalar(db_url, "SELECT call_id FROM imagen.usage WHERE job_id = %s", claim.job_id))
        == calls(settings)[0]
    )
    run_sync(ctx, str(claim.job_id), claim.attempt)
    (finalize,) = [args for actor, args in ctx.broker.sent if actor == FINALIZE_ACTOR]
    run_finalize(ctx, *finalize)
    assert scalar(db_url, "SELECT status FROM imagen.jobs WHERE id = %s", claim.job_id) == "done"


def test_replay_while_the_database_is_still_away_keeps_every_record(tmp_path: Path) -> None:
    spool = UsageSpool(tmp_path / "spool")
    records = [record_for() for _ in range(3)]
    for record in records:
        assert spool.put(record)
    assert spool.replay(database_away) == 0
    kept = sorted(p.name for p in spool.pending())
    assert kept == sorted(f"{r.call_id}.json" for r in records)
    assert UsageRecord.from_json(json.loads(spool.pending()[0].read_text())) in records


def test_a_record_the_database_refuses_is_moved_aside_not_retried_forever(
    db_url: str, tmp_path: Path
) -> None:
    spool = UsageSpool(tmp_path / "spool")
    good, orphan = record_for(), record_for(job_id=uuid.uuid4())  # no such job: the foreign key refuses it
    spool.put(orphan)
    spool.put(good)
    assert spool.replay(lambda: psycopg.connect(db_url, autocommit=True)) == 1
    assert spool.pending() == []
    assert (tmp_path / "spool" / REJECTED / f"{orphan.call_id}.json").is_file()
    assert scalar(db_url, "SELECT count(*) FROM imagen.usage WHERE call_id = %s", good.call_id) == 1


def test_a_record_written_twice_is_one_row_and_a_writer_naming_no_call_id_gets_one(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO imagen.usage (backend, model, ok) VALUES ('mock', 'm', true)")
        (call_id,) = conn.execute("SELECT call_id FROM imagen.usage").fetchone() or (None,)
        assert call_id is not None, "a writer that names no call id (an older worker) gets a fresh one"
        sink = DatabaseSink(PostgresJobStore(lambda: psycopg.connect(db_url, autocommit=True)))
        record = record_for()
        sink.record(record)
        sink.record(record)
        assert conn.execute("SELECT count(*) FROM imagen.usage").fetchone() == (2,)
        written = conn.execute(
            "SELECT written_at - created_at FROM imagen.usage WHERE call_id = %s", (record.call_id,)
        )
        (window,) = written.fetchone() or (None,)
        assert window is not None and window.total_seconds() >= 0
