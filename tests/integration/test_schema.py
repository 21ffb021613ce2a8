"""The schema's own behaviour: the insert notification, constraints, triggers and the realtime publication."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from imagen import db, jobs

pytestmark = pytest.mark.integration

OWNER = uuid.UUID("3b0f6a2e-8a9f-4a57-9d0e-0d2b3c4d5e6f")
# How long to watch for a notification that must NOT arrive. Absence cannot be
# waited on as a condition; a notification sent at commit arrives in well under this.
QUIET = 0.3


def _notifications(conn: psycopg.Connection[Any], timeout: float, stop_after: int | None = None) -> list[str]:
    return [f"{n.channel}:{n.payload}" for n in conn.notifies(timeout=timeout, stop_after=stop_after)]


def _job(conn: psycopg.Connection[Any], **columns: Any) -> uuid.UUID:
    columns = {"owner_user_id": OWNER, "prompt": "a cat", **columns}
    names = ", ".join(columns)
    marks = ", ".join(["%s"] * len(columns))
    row = conn.execute(
        f"insert into imagen.jobs ({names}) values ({marks}) returning id",  # type: ignore[arg-type]
        list(columns.values()),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def _row(conn: psycopg.Connection[Any], job: uuid.UUID, columns: str) -> tuple[Any, ...]:
    row = conn.execute(f"select {columns} from imagen.jobs where id = %s", (job,)).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return tuple(row)


def test_insert_notifies_listeners_once_and_only_after_commit(db_url: str) -> None:
    with (
        psycopg.connect(db_url, autocommit=True) as listener,
        psycopg.connect(db_url) as writer,
    ):
        listener.execute("LISTEN imagen_jobs")
        writer.execute(
            "insert into imagen.jobs (owner_user_id, prompt)"
            " select %s, 'cat ' || n from generate_series(1, 1000) as n",
            (OWNER,),
        )
        assert _notifications(listener, QUIET) == []

        writer.commit()
        assert _notifications(listener, 10, stop_after=1) == ["imagen_jobs:insert"]
        assert _notifications(listener, QUIET) == []

        writer.execute("update imagen.jobs set status = 'running'")
        writer.commit()
        assert _notifications(listener, QUIET) == [], "only inserts wake the listener"

        writer.execute("insert into imagen.jobs (owner_user_id, prompt) values (%s, 'one more')", (OWNER,))
        writer.rollback()
        assert _notifications(listener, QUIET) == [], "a rolled back insert must not wake anyone"


def test_notify_trigger_is_statement_level(db_url: str) -> None:
    # PostgreSQL folds identical notifications within one transaction, so one
    # notification per multi-row insert does not by itself prove the trigger fires
    # once per statement rather than once per row; the catalog does.
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "select tgtype & 1 = 0, tgtype & 4 <> 0 from pg_trigger"
            " where tgrelid = 'imagen.jobs'::regclass and tgname = 'jobs_notify_insert'"
        ).fetchone()
    assert row == (True, True), "expected FOR EACH STATEMENT, AFTER INSERT"


def test_trigger_functions_pin_an_empty_search_path_and_the_fair_round_its_index_plans(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "select p.proname, p.proconfig from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
            " where n.nspname = 'imagen' order by p.proname"
        ).fetchall()
    assert rows == [
        ("jobs_before_update", ['search_path=""']),
        # sql/017: its cached lookups are index scans even under an empty table's statistics.
        ("jobs_fair_round", ['search_path=""', "enable_seqscan=off"]),
        ("jobs_notify_insert", ['search_path=""']),
        ("jobs_notify_pending", ['search_path=""']),
        ("jobs_server_id", ['search_path=""']),
        ("jobs_stamp_pending", ['search_path=""']),
    ]


@pytest.mark.parametrize(
    ("prompt", "constraint"),
    [
        ("", "jobs_prompt_check"),
        ("   \t\n ", "jobs_prompt_check"),
        ("\r\n\x0b\f", "jobs_prompt_check"),
        ("x" * 4001, "jobs_prompt_check"),
    ],
    ids=["blank", "whitespace", "line-breaks", "4001-chars"],
)
def test_bad_prompt_is_refused(db_url: str, prompt: str, constraint: str) -> None:
    with psycopg.connect(db_url) as conn, pytest.raises(errors.CheckViolation) as raised:
        _job(conn, prompt=prompt)
    assert raised.value.diag.constraint_name == constraint


def test_prompt_of_4000_chars_is_accepted(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        job = _job(conn, prompt="é" * 4000)
        assert _row(conn, job, "char_length(prompt)") == (4000,)


@pytest.mark.parametrize("params", ["[]", '"a string"', "42", "null"])
def test_params_must_be_an_object(db_url: str, params: str) -> None:
    with psycopg.connect(db_url) as conn, pytest.raises(errors.CheckViolation) as raised:
        conn.execute(
            "insert into imagen.jobs (owner_user_id, prompt, params) values (%s, 'a cat', %s::jsonb)",
            (OWNER, params),
        )
    assert raised.value.diag.constraint_name == "jobs_params_check"


def test_params_larger_than_any_job_needs_are_refused(db_url: str) -> None:
    """A user cannot make a worker read megabytes of params; the largest real params still fit."""
    largest = {"negative_prompt": "\x01" * 2000, "backend": "b" * 40, "model": "m" * 100, "preset": "p" * 60}
    with psycopg.connect(db_url) as conn:
        _job(conn, params=Jsonb(largest))
        with pytest.raises(errors.CheckViolation) as raised:
            _job(conn, params=Jsonb({"pad": "x" * 20_000}))
    assert raised.value.diag.constraint_name == "jobs_params_size_check"


def test_params_may_not_be_sql_null(db_url: str) -> None:
    with psycopg.connect(db_url) as conn, pytest.raises(errors.NotNullViolation):
        conn.execute(
            "insert into imagen.jobs (owner_user_id, prompt, params) values (%s, 'a cat', null)", (OWNER,)
        )


@pytest.mark.parametrize(
    ("column", "value", "constraint"),
    [("status", "finished", "jobs_status_check"), ("stage", "uploading", "jobs_stage_check")],
)
def test_unknown_status_or_stage_is_refused(db_url: str, column: str, value: str, constraint: str) -> None:
    with psycopg.connect(db_url) as conn, pytest.raises(errors.CheckViolation) as raised:
        _job(conn, **{column: value})
    assert raised.value.diag.constraint_name == constraint


def test_new_job_defaults(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        job = _job(conn)
        row = _row(
            conn,
            job,
            "status, stage, attempt, params, stage_times, error, last_error, image_id,"
            " claimed_at, heartbeat_at, finished_at, created_at = updated_at",
        )
    assert row == ("pending", None, 0, {}, {}, None, None, None, None, None, None, True)


def test_update_stamps_updated_at(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        job = _job(conn)
        conn.commit()
        (created,) = _row(conn, job, "updated_at")
        conn.commit()
        conn.execute(
            "update imagen.jobs set status = 'running', stage = 'generating', attempt = 1 where id = %s",
            (job,),
        )
        updated_at, finished_at = _row(conn, job, "updated_at, finished_at")
    assert updated_at > created
    assert finished_at is None


@pytest.mark.parametrize("status", ["done", "failed", "cancelled"])
def test_terminal_status_stamps_finished_at(db_url: str, status: str) -> None:
    with psycopg.connect(db_url) as conn:
        job = _job(conn, status="running", stage="syncing")
        conn.commit()
        conn.execute("update imagen.jobs set status = %s where id = %s", (status, job))
        finished_at, now, stage = _row(conn, job, "finished_at, now(), stage")
    assert finished_at == now
    # A cancelled job is no longer anywhere; a finished or failed one keeps its last stage.
    assert stage == (None if status == "cancelled" else "syncing")


def test_finished_at_given_by_the_worker_is_kept(db_url: str) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with psycopg.connect(db_url) as conn:
        job = _job(conn, status="running")
        conn.execute("update imagen.jobs set status = 'done', finished_at = %s where id = %s", (at, job))
        assert _row(conn, job, "finished_at") == (at,)


def test_later_updates_do_not_move_finished_at(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        job = _job(conn, status="running")
        conn.commit()
        conn.execute("update imagen.jobs set status = 'failed', error = 'boom' where id = %s", (job,))
        conn.commit()
        (first,) = _row(conn, job, "finished_at")
        conn.commit()
        conn.execute("update imagen.jobs set error = 'boom, explained' where id = %s", (job,))
        finished_at, updated_at = _row(conn, job, "finished_at, updated_at")
    assert finished_at == first
    assert updated_at > first


def test_deleting_an_image_unlinks_its_job(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        image = conn.execute(
            "insert into imagen.images (bucket, path, mime, width, height, bytes, prompt, backend)"
            " values ('imagen', 'x.png', 'image/png', 1, 1, 1, 'a cat', 'mock') returning id"
        ).fetchone()
        assert image is not None
        job = _job(conn, status="done", image_id=image[0])
        conn.execute("delete from imagen.images where id = %s", (image[0],))
        assert _row(conn, job, "image_id, status") == (None, "done")


def test_one_image_per_job_and_per_object(db_url: str) -> None:
    insert = (
        "insert into imagen.images (job_id, bucket, path, mime, width, height, bytes, prompt, backend)"
        " values (%s, 'imagen', %s, 'image/png', 1, 1, 1, 'a cat', 'mock')"
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        job = _job(conn)
        conn.execute(insert, (job, "a.png"))
        with pytest.raises(errors.UniqueViolation, match="images_job_id_key"):
            conn.execute(insert, (job, "b.png"))
        with pytest.raises(errors.UniqueViolation, match="images_bucket_path_key"):
            conn.execute(insert, (None, "a.png"))
        # CLI runs have no job: any number of them.
        conn.execute(insert, (None, "c.png"))
        conn.execute(insert, (None, "d.png"))


def test_claim_queue_indexes_exist(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        indexes = dict(
            conn.execute(
                "select indexname, indexdef from pg_indexes where schemaname = 'imagen' and tablename = 'jobs'"
            ).fetchall()
        )
    assert indexes["jobs_claim_idx"].endswith(
        "(fair_round, created_at, id) WHERE ((status = 'pending'::text) AND (fair_round IS NOT NULL))"
    )
    assert indexes["jobs_pending_idx"].endswith(
        "(owner_user_id, fair_round) WHERE ((status = 'pending'::text) AND (owner_user_id IS NOT NULL))"
    )
    assert indexes["jobs_owner_idx"].endswith("(owner_user_id, created_at DESC)")
    assert indexes["jobs_running_idx"].endswith(
        "(claimed_at) WHERE ((status = 'running'::text) AND (owner_user_id IS NOT NULL))"
    )


def test_stage_starts_and_heartbeats_of_a_running_job_are_hot_updates(db_url: str) -> None:
    # The in-flight count scans the running jobs' index. Updates of a running job that touch no
    # indexed column are HOT: they add no index entry, so the count does not slow down with every
    # stage start and heartbeat until the next vacuum.
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = jobs.submit_job(conn, uuid.uuid4(), "hot", {})
        (claim,) = jobs.claim_jobs(conn, 1)
        updates = (
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
            " WHERE schemaname = 'imagen' AND relname = 'jobs'"
        )
        with conn.transaction():  # the counts are this backend's, unflushed: exact within it
            before = conn.execute(updates).fetchone()
            assert jobs.begin_stage(conn, job_id, claim.attempt, "generating") is not None
            assert jobs.heartbeat_many(conn, [(str(job_id), claim.attempt)]) == 1
            assert jobs.note_transient(conn, job_id, claim.attempt, "503 from the provider")
            after = conn.execute(updates).fetchone()
    assert before is not None and after is not None
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3), "three updates, all HOT"


def _published(url: str) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "select schemaname::text, tablename::text from pg_publication_tables"
            " where pubname = 'supabase_realtime' and schemaname = 'imagen'"
        ).fetchall()
    return [(str(s), str(t)) for s, t in rows]


def test_jobs_join_the_realtime_publication_where_it_exists(fresh_db_url: str) -> None:
    with psycopg.connect(fresh_db_url, autocommit=True) as conn:
        conn.execute("create publication supabase_realtime")
    db.migrate(fresh_db_url)
    assert _published(fresh_db_url) == [("imagen", "jobs")]


def test_an_all_tables_realtime_publication_is_left_alone(fresh_db_url: str) -> None:
    with psycopg.connect(fresh_db_url, autocommit=True) as conn:
        conn.execute("create publication supabase_realtime for all tables")
    db.migrate(fresh_db_url)
    assert ("imagen", "jobs") in _published(fresh_db_url)


def test_no_realtime_publication_is_skipped_silently(fresh_db_url: str) -> None:
    assert "004_security.sql" in db.migrate(fresh_db_url)
    with psycopg.connect(fresh_db_url) as conn:
        assert conn.execute("select count(*) from pg_publication").fetchone() == (0,)
