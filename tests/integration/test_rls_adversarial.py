"""Row level security under attack, and secrets that must never reach a log or an error.

Every request runs as PostgREST runs it: one transaction, SET LOCAL ROLE and the
JWT claims in `request.jwt.claims`. These extend tests/integration/test_rls.py
(which proves each grant and policy) with what an attacker would try: other
owners' rows by id, upserts onto their ids, status jumps, forged owners and
claims, anon with a user's claims, SQL and path traversal in what users write,
and calls to the schema's internals. The last test runs the real processes with
distinctive fake keys and fails if any of them shows up where a person can read it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

from imagen import jobs, jobs_admin
from imagen.config import Settings
from imagen.devtools.servers import free_port
from imagen.stages import StageContext, run_finalize, run_generate, run_sync
from imagen.store import PostgresJobStore
from tests.integration.conftest import RecordingBroker
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

RLS = "row-level security"
DENIED = "permission denied"
SQL_PROMPT = "'); DELETE FROM imagen.jobs; DROP TABLE imagen.images; --"
SQL_PARAMS = {
    "negative_prompt": "' OR '1'='1'; UPDATE imagen.jobs SET status = 'done'; --",
    "model": "$$; SELECT pg_sleep(30); $$",
    "x'); DROP SCHEMA imagen CASCADE; --": '{"a": 1}',
}
TRAVERSAL = "../../../../../../etc/passwd"


@dataclass
class Town:
    """Two owners, each with a pending job, an image and a usage row; the owner has jobs in every state."""

    conn: psycopg.Connection[Any]
    owner: uuid.UUID
    other: uuid.UUID
    jobs: dict[str, uuid.UUID]
    other_job: uuid.UUID
    other_image: uuid.UUID


def _job(conn: psycopg.Connection[Any], owner: uuid.UUID, status: str = "pending") -> uuid.UUID:
    row = conn.execute(
        "INSERT INTO imagen.jobs (owner_user_id, prompt, status) VALUES (%s, 'a cat', %s) RETURNING id",
        (owner, status),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def _image(conn: psycopg.Connection[Any], owner: uuid.UUID, job: uuid.UUID) -> uuid.UUID:
    row = conn.execute(
        "INSERT INTO imagen.images (owner_user_id, job_id, bucket, path, mime, width, height, bytes, prompt,"
        " backend) VALUES (%s, %s, 'imagen', %s, 'image/png', 16, 16, 10, 'a cat', 'mock') RETURNING id",
        (owner, job, f"{owner}/{job}.png"),
    ).fetchone()
    assert row is not None
    conn.execute(
        "INSERT INTO imagen.usage (owner_user_id, job_id, backend, model, images, ok)"
        " VALUES (%s, %s, 'mock', 'mock-1', 1, true)",
        (owner, job),
    )
    return uuid.UUID(str(row[0]))


@pytest.fixture(scope="module")
def town_db(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """One database for the module's attacks: each checks that it changed nothing, so they can share it."""
    name = f"imagen_rls_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield psycopg.conninfo.make_conninfo(pg_admin_url, dbname=name)
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def town(town_db: str) -> Iterator[Town]:
    owner, other = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(town_db) as conn:
        mine = {
            status: _job(conn, owner, status)
            for status in ("pending", "running", "done", "failed", "cancelled")
        }
        _image(conn, owner, mine["done"])
        other_job = _job(conn, other)
        other_image = _image(conn, other, other_job)
        conn.commit()
        yield Town(conn, owner, other, mine, other_job, other_image)


@contextmanager
def request(
    conn: psycopg.Connection[Any],
    role: str = "authenticated",
    claims: Any = None,
    *,
    raw_claims: str | None = None,
) -> Iterator[psycopg.Connection[Any]]:
    """One PostgREST request: a transaction, SET LOCAL ROLE, the JWT claims; committed unless it fails.

    Committed as PostgREST commits, so an attack that silently succeeded would persist and the
    `unchanged` fixture would see it.
    """
    with conn.transaction():
        conn.execute(f"SET LOCAL ROLE {role}")
        text = raw_claims if raw_claims is not None else (json.dumps(claims) if claims is not None else None)
        if text is not None:
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (text,))
        yield conn


def as_user(conn: psycopg.Connection[Any], user: uuid.UUID, **extra: Any) -> Any:
    return request(conn, claims={"sub": str(user), "role": "authenticated", **extra})


def _snapshot(town: Town) -> list[tuple[Any, ...]]:
    """Everything an attack could change, read as the table owner."""
    rows = town.conn.execute(
        "SELECT id, owner_user_id, prompt, params, status, attempt, error, image_id, stage FROM imagen.jobs"
        " ORDER BY id"
    ).fetchall()
    rows += town.conn.execute(
        "SELECT id, owner_user_id, job_id, path FROM imagen.images ORDER BY id"
    ).fetchall()
    rows += town.conn.execute(
        "SELECT id, owner_user_id, job_id, cost_usd FROM imagen.usage ORDER BY id"
    ).fetchall()
    town.conn.commit()
    return rows


@pytest.fixture
def unchanged(town: Town) -> Iterator[None]:
    """Fails the test if the attack changed any committed row, whatever it raised."""
    before = _snapshot(town)
    yield
    assert _snapshot(town) == before


# Reading other owners' rows, by every handle an attacker could hold.


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT id FROM imagen.jobs WHERE id = %(job)s",
        "SELECT id FROM imagen.jobs WHERE owner_user_id = %(other)s",
        "SELECT id FROM imagen.images WHERE id = %(image)s",
        "SELECT id FROM imagen.images WHERE job_id = %(job)s OR owner_user_id = %(other)s",
        "SELECT id FROM imagen.usage WHERE job_id = %(job)s OR owner_user_id = %(other)s",
        "SELECT j.id FROM imagen.jobs j JOIN imagen.images i ON i.job_id = j.id WHERE i.owner_user_id = %(other)s",
        "SELECT id FROM imagen.jobs WHERE owner_user_id <> %(me)s",
    ],
)
def test_no_handle_reads_another_owners_rows(town: Town, statement: str) -> None:
    names = {"job": town.other_job, "other": town.other, "image": town.other_image, "me": town.owner}
    with as_user(town.conn, town.owner) as conn:
        assert conn.execute(statement, names).fetchall() == []


def test_aggregates_count_only_the_callers_rows(town: Town) -> None:
    with as_user(town.conn, town.owner) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM imagen.jobs), (SELECT count(*) FROM imagen.images),"
            " (SELECT count(*) FROM imagen.usage)"
        ).fetchone()
    assert counts == (5, 1, 1)


# Writing other owners' rows.


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        ("UPDATE imagen.jobs SET prompt = 'mine now' WHERE id = %(job)s", DENIED),
        ("UPDATE imagen.jobs SET params = '{}' WHERE id = %(job)s", DENIED),
        ("UPDATE imagen.jobs SET owner_user_id = %(me)s WHERE id = %(job)s", DENIED),
        ("DELETE FROM imagen.jobs WHERE id = %(job)s", DENIED),
        ("UPDATE imagen.images SET owner_user_id = %(me)s WHERE id = %(image)s", DENIED),
        ("DELETE FROM imagen.images WHERE id = %(image)s", DENIED),
        ("UPDATE imagen.usage SET cost_usd = 0 WHERE owner_user_id = %(other)s", DENIED),
        ("DELETE FROM imagen.usage", DENIED),
        ("TRUNCATE imagen.jobs", DENIED),
        (
            "INSERT INTO imagen.images (owner_user_id, job_id, bucket, path, mime, width, height, bytes,"
            " prompt, backend) VALUES (%(me)s, %(job)s, 'imagen', 'x.png', 'image/png', 1, 1, 1, 'x', 'mock')",
            DENIED,
        ),
        (
            "INSERT INTO imagen.usage (owner_user_id, job_id, backend, model, ok, cost_usd)"
            " VALUES (%(other)s, %(job)s, 'mock', 'mock-1', true, 1000)",
            DENIED,
        ),
        # An upsert onto another owner's job id: naming the id at all is refused (ids are the server's).
        (
            "INSERT INTO imagen.jobs (id, owner_user_id, prompt) VALUES (%(job)s, %(me)s, 'x')"
            " ON CONFLICT (id) DO UPDATE SET status = 'cancelled'",
            DENIED,
        ),
    ],
)
def test_another_owners_rows_cannot_be_written(
    town: Town, unchanged: None, statement: str, expected: str
) -> None:
    names = {"job": town.other_job, "other": town.other, "image": town.other_image, "me": town.owner}
    with pytest.raises(errors.InsufficientPrivilege, match=expected), as_user(town.conn, town.owner) as conn:
        conn.execute(statement, names)


def test_upsert_onto_own_job_id_cannot_rewrite_it(town: Town, unchanged: None) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match=DENIED), as_user(town.conn, town.owner) as conn:
        conn.execute(
            "INSERT INTO imagen.jobs (id, owner_user_id, prompt) VALUES (%s, %s, 'x')"
            " ON CONFLICT (id) DO UPDATE SET prompt = excluded.prompt",
            (town.jobs["pending"], town.owner),
        )


# Job ids are the server's: no choosing one, no learning whether another owner's exists.


def postgrest_insert(conn: psycopg.Connection[Any], body: dict[str, Any]) -> Any:
    """POST /jobs as PostgREST runs it: the JSON body's keys, and only those, become the column list."""
    columns = ", ".join(f'"{key}"' for key in body)
    return conn.execute(
        f'WITH pgrst_body AS (SELECT %s::json AS body) INSERT INTO "imagen"."jobs"({columns})'
        f" SELECT {columns} FROM json_populate_recordset(null::imagen.jobs,"
        " (SELECT json_build_array(body) FROM pgrst_body)) RETURNING id",
        (json.dumps(body, default=str),),
    ).fetchone()


@pytest.mark.parametrize("whose", ["another owner's job", "my own job", "a pruned job", "no job"])
@pytest.mark.parametrize("upsert", ["", " ON CONFLICT DO NOTHING"])
def test_an_insert_naming_the_id_is_refused_alike_whoever_has_it(
    town: Town, unchanged: None, whose: str, upsert: str
) -> None:
    """The same refusal for every id, before any uniqueness check: no 23505 says an id exists."""
    chosen = {
        "another owner's job": town.other_job, "my own job": town.jobs["pending"],
        "a pruned job": uuid.uuid4(), "no job": uuid.uuid4(),
    }[whose]  # fmt: skip
    with pytest.raises(errors.InsufficientPrivilege) as caught, as_user(town.conn, town.owner) as conn:
        conn.execute(
            f"INSERT INTO imagen.jobs (id, owner_user_id, prompt) VALUES (%s, %s, 'x'){upsert}",
            (chosen, town.owner),
        )
    assert str(caught.value).startswith("permission denied for table jobs"), caught.value
    with pytest.raises(errors.InsufficientPrivilege) as again, as_user(town.conn, town.owner) as conn:
        postgrest_insert(conn, {"id": str(chosen), "owner_user_id": str(town.owner), "prompt": "x"})
    assert str(again.value) == str(caught.value)


def test_the_uis_insert_without_an_id_gets_a_fresh_one(town: Town) -> None:
    with as_user(town.conn, town.owner) as conn:
        row = postgrest_insert(conn, {"owner_user_id": str(town.owner), "prompt": "a fox", "params": {}})
    try:
        assert row is not None and uuid.UUID(str(row[0])) not in {*town.jobs.values(), town.other_job}
    finally:
        town.conn.execute("DELETE FROM imagen.jobs WHERE id = %s", (row[0],))
        town.conn.commit()


def test_a_table_wide_insert_grant_still_cannot_choose_the_id(town: Town, unchanged: None) -> None:
    """Defence in depth: Supabase's "grant all on all tables" recipe gives the column back; the
    trigger still replaces the id of any row inserted under row level security."""
    with town.conn.transaction():  # rolled back, grant and row
        town.conn.execute("GRANT INSERT ON imagen.jobs TO authenticated")
        with as_user(town.conn, town.owner) as conn:
            row = postgrest_insert(
                conn, {"id": str(town.other_job), "owner_user_id": str(town.owner), "prompt": "x"}
            )
        assert row is not None and uuid.UUID(str(row[0])) != town.other_job
        raise psycopg.Rollback()


@pytest.mark.parametrize("how", ["chained stages", "split stages", "split stages, cancelled before finalize"])
def test_a_reused_job_id_after_prune_never_reaches_the_first_owners_image(
    db_url: str, redis_url: str, tmp_path: Path, how: str
) -> None:
    """Finding 1 of issue 14: A's job is done and pruned; its id comes back for owner B (a user
    cannot choose it any more, so the row is put there as the database owner: the worst case).
    B's job must get its own image, and nothing B's stages do may return, link or delete A's."""
    settings = Settings(
        _env_file=None, database_url=db_url, redis_url=redis_url, storage="local",
        storage_dir=tmp_path / "storage", output_dir=tmp_path / "out", listener_metrics_port=0,
        chain_stages=how == "chained stages",
    )  # fmt: skip
    first, second = uuid.uuid4(), uuid.uuid4()
    ctx = StageContext(settings, RecordingBroker())
    ctx.chain_for_worker(None)

    def run(job_id: uuid.UUID, attempt: int, *, cancel_before_finalize: bool = False) -> None:
        ctx.broker.sent.clear()
        run_generate(ctx, str(job_id), attempt)
        if ctx.chain_stages:
            return
        run_sync(ctx, str(job_id), attempt)
        if cancel_before_finalize:
            with as_user(conn, second) as user:
                assert (
                    user.execute(
                        "UPDATE imagen.jobs SET status = 'cancelled' WHERE id = %s", (job_id,)
                    ).rowcount
                    == 1
                )
        (final,) = [args for actor, args in ctx.broker.sent if actor == "finalize_stage"]
        run_finalize(ctx, *final)

    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            job_id = jobs.submit_job(conn, first, "the first owner's cat", {"size": "16x16"})
            (claim,) = jobs.claim_jobs(conn, 1)
            run(job_id, claim.attempt)
            first_image = conn.execute(
                "SELECT id, owner_user_id, path FROM imagen.images WHERE job_id = %s", (job_id,)
            ).fetchone()
            assert first_image is not None and first_image[1] == first
            first_object = tmp_path / "storage" / "imagen" / first_image[2]
            first_bytes = first_object.read_bytes()

            pruned = jobs_admin.prune(PostgresJobStore.from_url(db_url), timedelta(0))
            assert (pruned.count, pruned.images_detached) == (1, 1)
            with pytest.raises(errors.InsufficientPrivilege), as_user(conn, second) as user:
                postgrest_insert(user, {"id": str(job_id), "owner_user_id": str(second), "prompt": "mine?"})
            conn.execute(
                "INSERT INTO imagen.jobs (id, owner_user_id, prompt, params) VALUES (%s, %s, 'an intruder', %s)",
                (job_id, second, Jsonb({"size": "16x16"})),
            )
            (claim,) = jobs.claim_jobs(conn, 1)
            cancelled = how.endswith("cancelled before finalize")
            run(job_id, claim.attempt, cancel_before_finalize=cancelled)

            status, image_id = conn.execute(
                "SELECT status, image_id FROM imagen.jobs WHERE id = %s", (job_id,)
            ).fetchone() or (None, None)
            images = conn.execute(
                "SELECT id, owner_user_id, job_id, path, prompt FROM imagen.images ORDER BY created_at"
            ).fetchall()
    finally:
        ctx.close()
    assert images[0] == (first_image[0], first, None, first_image[2], "the first owner's cat")
    assert first_object.read_bytes() == first_bytes, "the first owner's object is untouched"
    if cancelled:
        assert (status, image_id) == ("cancelled", None)
        assert len(images) == 1, "the cancelled job's own image is discarded, and only that"
        assert not (tmp_path / "storage" / "imagen" / f"{second}/{job_id}.png").exists()
    else:
        assert status == "done" and image_id != first_image[0]
        assert images[1] == (image_id, second, job_id, f"{second}/{job_id}.png", "an intruder")


# What a job may ask of the workers: the operator's policy, time, memory.


def _settings(db_url: str, redis_url: str, tmp_path: Path, **fields: Any) -> Settings:
    return Settings(
        _env_file=None, database_url=db_url, redis_url=redis_url, storage="local",
        storage_dir=tmp_path / "storage", output_dir=tmp_path / "out", listener_metrics_port=0, **fields,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("configured", "params", "setting"),
    [
        ({}, {"backend": "mock", "delay_ms": 600_000}, "IMAGEN_JOB_TEST_OPTIONS=true"),
        ({}, {"fail": "transient"}, "IMAGEN_JOB_TEST_OPTIONS=true"),
        ({"backend": "openai"}, {"backend": "mock", "size": "16x16"}, "IMAGEN_JOB_BACKENDS"),
        ({}, {"size": "4096x4096"}, "IMAGEN_MAX_PIXELS"),
        (
            {"job_backends": "mock,openai", "openai_api_key": "sk-test"},
            {"backend": "openai", "model": "gpt-image-9-ultra"},
            "IMAGEN_JOB_OPENAI_MODELS",
        ),
    ],
    ids=["mock-delay", "mock-fail", "mock-not-offered", "too-many-pixels", "model-not-offered"],
)
def test_a_job_asking_for_more_than_the_policy_allows_fails_at_once(
    db_url: str,
    redis_url: str,
    tmp_path: Path,
    configured: dict[str, Any],
    params: dict[str, Any],
    setting: str,
) -> None:
    """Findings 2 and 3: under the default policy (or an operator's), a refused param ends the job
    failed at once, before any provider call, with an error that names the setting to change."""
    settings = _settings(db_url, redis_url, tmp_path, **configured)
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = jobs.submit_job(conn, uuid.uuid4(), "a cat", params)
        (claim,) = jobs.claim_jobs(conn, 1)
    ctx = StageContext(settings, RecordingBroker())
    started = time.monotonic()
    try:
        run_generate(ctx, str(job_id), claim.attempt)
    finally:
        ctx.close()
    with psycopg.connect(db_url, autocommit=True) as conn:
        status, error = conn.execute(
            "SELECT status, error FROM imagen.jobs WHERE id = %s", (job_id,)
        ).fetchone() or (None, None)
        calls = conn.execute("SELECT count(*) FROM imagen.usage WHERE job_id = %s", (job_id,)).fetchone()
    assert status == "failed" and error.startswith("generation failed: ") and setting in error, error
    assert time.monotonic() - started < 5 and ctx.broker.sent == [], "no wait, no retry, no next stage"
    assert calls == (0,), "refused before any provider call"


def _job_row(db_url: str, job_id: uuid.UUID) -> dict[str, Any]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = jobs.get_job(conn, job_id)
    assert row is not None
    return row


def test_a_600_s_delay_ends_at_a_short_time_limit_and_frees_the_thread_for_another_owner(
    db_url: str, pipeline: Any
) -> None:
    """Finding 2: with test options on, a ten-minute simulated call ends at the stage's time limit
    (its thread is not held in a sleep, nor its lease kept fresh) and another owner's job, waiting
    for the only worker thread, runs right after."""
    procs = pipeline(
        threads=1, IMAGEN_JOB_TEST_OPTIONS="true", IMAGEN_GENERATE_TIME_LIMIT="6", IMAGEN_PROVIDER_TIMEOUT="4",
        IMAGEN_STAGE_RETRIES="0",
    )  # fmt: skip
    with psycopg.connect(db_url, autocommit=True) as conn:
        hog = jobs.submit_job(conn, uuid.uuid4(), "hold the thread", {"delay_ms": 600_000, "size": "16x16"})
        wait_until(lambda: _job_row(db_url, hog)["stage"] == "generating", timeout=20, message=procs.logs())
        other = jobs.submit_job(conn, uuid.uuid4(), "another owner's cat", {"size": "16x16"})
    wait_until(
        lambda: _job_row(db_url, other)["status"] == "done", timeout=40, message=f"other done\n{procs.logs()}"
    )
    wait_until(lambda: _job_row(db_url, hog)["status"] == "failed", timeout=20, message=procs.logs())
    held = _job_row(db_url, hog)
    took = (held["finished_at"] - held["claimed_at"]).total_seconds()
    assert took < 6 + 5, f"the delay held its job for {took:.1f} s"
    assert held["error"] == (
        "generation gave up after 1 tries: generation: stopped at the stage's time limit"
        " (6 s, IMAGEN_GENERATE_TIME_LIMIT)"
    ), held["error"]
    assert _job_row(db_url, other)["finished_at"] >= held["finished_at"] - timedelta(seconds=2)


def test_sigterm_during_a_600_s_call_exits_within_the_shutdown_grace(db_url: str, pipeline: Any) -> None:
    """Finding 2: SIGTERM gives a call in progress IMAGEN_SHUTDOWN_GRACE, then abandons it (the job is
    retried later), however long the call would have taken and however long the stage's limit is."""
    procs = pipeline(threads=1, IMAGEN_JOB_TEST_OPTIONS="true", IMAGEN_SHUTDOWN_GRACE="2")
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = jobs.submit_job(conn, uuid.uuid4(), "a long call", {"delay_ms": 600_000, "size": "16x16"})
    wait_until(lambda: _job_row(db_url, job_id)["stage"] == "generating", timeout=20, message=procs.logs())
    workers = next(p for p in procs.procs if p.name == "workers")
    stopped = time.monotonic()
    workers.send(signal.SIGTERM)
    assert workers.wait(30) == 0, workers.tail()
    took = time.monotonic() - stopped
    assert took < 2 + 8, f"SIGTERM took {took:.1f} s"
    row = _job_row(db_url, job_id)
    assert row["status"] == "running" and "worker stopped (SIGTERM)" in (row["last_error"] or ""), row
    # The message went back to Redis for its retry: a worker started later receives it (and, the
    # job cancelled meanwhile, drops it).
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert jobs.cancel_job(conn, job_id)
    again = pipeline(threads=1, IMAGEN_JOB_TEST_OPTIONS="true")
    wait_until(
        lambda: f"job {job_id} attempt=1 stage=generating dropped" in again.logs(),
        timeout=30,
        message=f"the retried message\n{again.logs()}",
    )


# Status jumps and edits of one's own jobs.


@pytest.mark.parametrize(
    ("start", "target"),
    [
        ("pending", "done"),
        ("pending", "running"),
        ("running", "done"),
        ("running", "failed"),
        ("running", "pending"),
        ("failed", "pending"),
        ("failed", "running"),
        ("cancelled", "pending"),
        ("cancelled", "running"),
        ("done", "pending"),
        ("done", "cancelled"),
        ("failed", "cancelled"),
    ],
)
def test_owner_cannot_jump_status(town: Town, unchanged: None, start: str, target: str) -> None:
    # From pending or running the cancel policy sees the row and its check refuses the new status;
    # from a finished state the row is invisible to the update: nothing happens either way.
    with as_user(town.conn, town.owner) as conn:
        try:
            with conn.transaction():
                cursor = conn.execute(
                    "UPDATE imagen.jobs SET status = %s WHERE id = %s", (target, town.jobs[start])
                )
                assert cursor.rowcount == 0
        except errors.InsufficientPrivilege as exc:
            assert RLS in str(exc)


@pytest.mark.parametrize(
    "assignment",
    [
        'params = \'{"backend": "openai"}\'',
        "params = params || '{\"seed\": 1}'",
        "prompt = 'something else', status = 'cancelled'",
        "status = 'cancelled', attempt = 0",
        "status = 'cancelled', image_id = NULL",
        "status = 'cancelled', error = NULL",
    ],
)
def test_owner_cannot_edit_prompt_params_or_worker_columns_after_insert(
    town: Town, unchanged: None, assignment: str
) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match=DENIED), as_user(town.conn, town.owner) as conn:
        conn.execute(f"UPDATE imagen.jobs SET {assignment} WHERE id = %s", (town.jobs["pending"],))


# Forged inserts.


@pytest.mark.parametrize(
    ("column", "value"),
    [("status", "'running'"), ("status", "'cancelled'"), ("attempt", "-1"), ("stage", "'finalizing'")],
)
def test_insert_cannot_forge_worker_state(town: Town, unchanged: None, column: str, value: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match=DENIED), as_user(town.conn, town.owner) as conn:
        conn.execute(f"INSERT INTO imagen.jobs (prompt, {column}) VALUES ('a dog', {value})")


def test_insert_cannot_link_another_owners_image(town: Town, unchanged: None) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match=DENIED), as_user(town.conn, town.owner) as conn:
        conn.execute("INSERT INTO imagen.jobs (prompt, image_id) VALUES ('a dog', %s)", (town.other_image,))


@pytest.mark.parametrize("forged", ["other", "random", "null"])
def test_insert_with_a_forged_owner_is_refused(town: Town, unchanged: None, forged: str) -> None:
    owner = {"other": town.other, "random": uuid.uuid4(), "null": None}[forged]
    with (
        pytest.raises((errors.InsufficientPrivilege, errors.NotNullViolation)),
        as_user(town.conn, town.owner) as conn,
    ):
        conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES (%s, 'on your bill')", (owner,))


def test_insert_many_rows_with_one_forged_owner_inserts_none(town: Town, unchanged: None) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match=RLS), as_user(town.conn, town.owner) as conn:
        conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt) SELECT CASE WHEN i = 50 THEN %s ELSE %s END,"
            " 'job ' || i FROM generate_series(1, 100) i",
            (town.other, town.owner),
        )


# Who is asking: anon, no claims, malformed claims.


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT id FROM imagen.jobs",
        "UPDATE imagen.jobs SET status = 'cancelled'",
        "INSERT INTO imagen.jobs (prompt) VALUES ('a cat')",
        "SELECT imagen.jobs_notify_insert()",
        "SELECT * FROM imagen.schema_migrations",
    ],
)
def test_anon_with_a_users_claims_is_still_refused(town: Town, unchanged: None, statement: str) -> None:
    claims = {"sub": str(town.owner), "role": "authenticated"}
    with (
        pytest.raises(errors.InsufficientPrivilege, match=DENIED),
        request(town.conn, "anon", claims) as conn,
    ):
        conn.execute(statement)


def test_request_without_claims_can_neither_insert_nor_cancel(town: Town, unchanged: None) -> None:
    with request(town.conn) as conn:
        assert conn.execute("SELECT auth.uid()").fetchone() == (None,)
        assert conn.execute("UPDATE imagen.jobs SET status = 'cancelled'").rowcount == 0
        assert conn.execute("SELECT count(*) FROM imagen.images").fetchone() == (0,)
        with pytest.raises((errors.InsufficientPrivilege, errors.NotNullViolation)), conn.transaction():
            conn.execute("INSERT INTO imagen.jobs (prompt) VALUES ('whose is this?')")


@pytest.mark.parametrize(
    "raw_claims",
    [
        '{"sub": "not-a-uuid", "role": "authenticated"}',
        '{"sub": "", "role": "authenticated"}',
        '{"sub": 42}',
        '{"sub": {"$ne": null}}',
        "{\"sub\": \"00000000-0000-0000-0000-000000000000' OR '1'='1\"}",
        "not json at all",
    ],
)
def test_malformed_sub_claim_fails_closed(town: Town, unchanged: None, raw_claims: str) -> None:
    # auth.uid() casts sub to uuid: a malformed one is an error, never a match-everything value.
    with pytest.raises(psycopg.DataError), request(town.conn, raw_claims=raw_claims) as conn:
        conn.execute("SELECT id FROM imagen.jobs").fetchall()


def test_a_role_claim_of_service_role_grants_nothing(town: Town) -> None:
    with request(town.conn, claims={"sub": str(town.owner), "role": "service_role"}) as conn:
        assert conn.execute(
            "SELECT count(*) FROM imagen.jobs WHERE owner_user_id = %s", (town.other,)
        ).fetchone() == (0,)


def test_a_user_without_jobs_sees_nothing_at_all(town: Town) -> None:
    with as_user(town.conn, uuid.uuid4()) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM imagen.jobs), (SELECT count(*) FROM imagen.images),"
            " (SELECT count(*) FROM imagen.usage)"
        ).fetchone()
    assert counts == (0, 0, 0)


# The schema's internals.


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT imagen.jobs_notify_insert()",
        "SELECT imagen.jobs_before_update()",
        "SELECT * FROM imagen.schema_migrations",
        "INSERT INTO imagen.schema_migrations (version, name, checksum) VALUES ('999', 'evil', 'x')",
        "DELETE FROM imagen.schema_migrations",
        "CREATE TABLE imagen.evil (id int)",
        "CREATE FUNCTION imagen.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        "ALTER TABLE imagen.jobs DISABLE ROW LEVEL SECURITY",
        "DROP POLICY jobs_select_own ON imagen.jobs",
        "ALTER TABLE imagen.jobs DISABLE TRIGGER jobs_notify_insert",
    ],
)
def test_internals_are_refused_to_authenticated(town: Town, unchanged: None, statement: str) -> None:
    with (
        pytest.raises((errors.InsufficientPrivilege, errors.UndefinedFunction)) as caught,
        as_user(town.conn, town.owner) as conn,
    ):
        conn.execute(statement)
    assert isinstance(caught.value, errors.InsufficientPrivilege) or "jobs_" in str(caught.value)


# What users write is stored verbatim and reaches no path.


def test_sql_in_prompt_and_params_is_stored_verbatim_and_harmless(town: Town) -> None:
    before = _snapshot(town)
    author = uuid.uuid4()
    job = jobs.submit_job(town.conn, author, SQL_PROMPT, SQL_PARAMS)
    try:
        with as_user(town.conn, author) as conn:
            stored = conn.execute("SELECT prompt, params FROM imagen.jobs WHERE id = %s", (job,)).fetchone()
        assert stored == (SQL_PROMPT, SQL_PARAMS)
        after = [row for row in _snapshot(town) if row[0] != job]
        assert after == before, "the other rows are untouched"
    finally:
        town.conn.execute("DELETE FROM imagen.jobs WHERE id = %s", (job,))
        town.conn.commit()


def test_path_traversal_in_prompt_and_params_never_reaches_a_path(
    db_url: str, redis_url: str, tmp_path: Path
) -> None:
    owner = uuid.uuid4()
    settings = Settings(
        _env_file=None, database_url=db_url, redis_url=redis_url, storage="local",
        storage_dir=tmp_path / "storage", output_dir=tmp_path / "out", listener_metrics_port=0,
    )  # fmt: skip
    params = {"size": "16x16", "negative_prompt": TRAVERSAL, "model": f"{TRAVERSAL}/model", "seed": 1}
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = jobs.submit_job(conn, owner, f"{TRAVERSAL} {SQL_PROMPT} /tmp/x\\..\\..", params)
        (claim,) = jobs.claim_jobs(conn, 1)
    ctx = StageContext(settings, RecordingBroker())
    try:
        run_generate(ctx, str(job_id), claim.attempt)
        run_sync(ctx, str(job_id), claim.attempt)
        (final,) = [args for actor, args in ctx.broker.sent if actor == "finalize_stage"]
        run_finalize(ctx, *final)
    finally:
        ctx.close()
    with psycopg.connect(db_url, autocommit=True) as conn:
        status, image_id = conn.execute(
            "SELECT status, image_id FROM imagen.jobs WHERE id = %s", (job_id,)
        ).fetchone() or (None, None)
        path = conn.execute("SELECT path FROM imagen.images WHERE id = %s", (image_id,)).fetchone()
    assert status == "done"
    assert path == (f"{owner}/{job_id}.png",)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        f"out/jobs/{job_id}.json",
        f"out/jobs/{job_id}.png",
        f"storage/imagen/{owner}/{job_id}.png",
    ]


# Secrets never reach a log or an error.


SECRETS = {
    "SUPABASE_SERVICE_ROLE_KEY": "sbsecret-SERVICEROLE-8c1f4e7a2b9d",
    "OPENAI_API_KEY": "sk-test-OPENAIKEY-5e1b2d7f9a3c",
    "GEMINI_API_KEY": "AIzaTest-GEMINIKEY-9c4e7a1b3d5f",
}


class _EchoHandler(BaseHTTPRequestHandler):
    """A provider and a storage API that answer 400 and echo every request header back in the error."""

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        echoed = "; ".join(f"{k}={v}" for k, v in self.headers.items())
        body = json.dumps(
            {
                "error": {"message": f"bad request: {echoed}", "type": "invalid_request_error", "code": 400,
                          "status": "INVALID_ARGUMENT"},
                "statusCode": "400", "message": f"bad request: {echoed}",
            }
        ).encode()  # fmt: skip
        self.send_response(400)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("upstream", ["dead-port", "echoing-server"])
def test_no_secret_reaches_logs_or_error_text(
    db_url: str, pipeline: Any, tmp_path: Path, echo_server: str, upstream: str
) -> None:
    base = f"http://127.0.0.1:{free_port()}" if upstream == "dead-port" else echo_server
    procs = pipeline(
        IMAGEN_STORAGE="supabase", SUPABASE_URL=base, OPENAI_BASE_URL=f"{base}/v1", GOOGLE_GEMINI_BASE_URL=base,
        IMAGEN_STAGE_RETRIES="1", IMAGEN_LOG_LEVEL="DEBUG", **SECRETS,
    )  # fmt: skip
    owner = uuid.uuid4()
    with psycopg.connect(db_url, autocommit=True) as conn:
        ids = [
            jobs.submit_job(conn, owner, "a cat", params)
            for params in ({"backend": "openai"}, {"backend": "gemini"}, {"backend": "mock", "size": "16x16"})
        ]

    def finished() -> bool:
        with psycopg.connect(db_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM imagen.jobs WHERE id = ANY(%s) AND status IN ('pending', 'running')",
                (ids,),
            ).fetchone()
        return row == (0,)

    wait_until(finished, timeout=60, message=f"jobs terminal\n{procs.logs()}")
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT status, coalesce(error, '') || ' ' || coalesce(last_error, '') FROM imagen.jobs WHERE id = ANY(%s)",
            (ids,),
        ).fetchall()
        usage = conn.execute(
            "SELECT coalesce(error, '') || ' ' || raw::text FROM imagen.usage WHERE job_id = ANY(%s)", (ids,)
        ).fetchall()
    assert [status for status, _ in rows] == ["failed"] * 3, rows
    logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("*.log"))
    texts = {"logs": logs, "jobs": " ".join(t for _, t in rows), "usage": " ".join(t for (t,) in usage)}
    if upstream == "echoing-server":
        # The keys were sent, echoed back in the errors, and redacted on their way to the row.
        assert "bad request" in texts["jobs"] and "Bearer ***" in texts["jobs"], texts["jobs"]
    for name, secret in SECRETS.items():
        for where, text in texts.items():
            assert secret not in text, f"{name} appears in {where}"
            assert secret[8:20] not in text, f"part of {name} appears in {where}"


def test_an_owner_cannot_choose_the_round_that_puts_a_job_ahead_of_other_owners(
    town: Town, unchanged: None
) -> None:
    """fair_round decides whose job the claim takes next: no grant names it, and even under a
    table-wide grant the insert trigger sets it, so a job asking for round -1000 waits its turn."""
    with pytest.raises(errors.InsufficientPrivilege), as_user(town.conn, town.owner) as conn:
        conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, fair_round) VALUES (%s, 'x', -1000)",
            (town.owner,),
        )
    with town.conn.transaction():  # rolled back, grant and row
        town.conn.execute("GRANT INSERT ON imagen.jobs TO authenticated")
        with as_user(town.conn, town.owner) as conn:
            row = postgrest_insert(
                conn, {"owner_user_id": str(town.owner), "prompt": "x", "fair_round": -1000}
            )
        assert row is not None
        got = town.conn.execute("SELECT fair_round FROM imagen.jobs WHERE id = %s", (row[0],)).fetchone()
        lowest = town.conn.execute(
            "SELECT min(fair_round) FROM imagen.jobs WHERE status = 'pending' AND id <> %s", (row[0],)
        ).fetchone()
        assert got is not None and lowest is not None
        assert got[0] >= (lowest[0] or 0), (got, lowest)
        raise psycopg.Rollback()
