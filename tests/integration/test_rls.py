"""Row level security and grants, exercised the way PostgREST runs a request.

PostgREST opens a transaction, switches to the request's role with SET LOCAL ROLE
and puts the JWT's claims in `request.jwt.claims`; `auth.uid()` reads `sub` from
there. Each test below fails if the grant or policy it names were removed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import errors

pytestmark = pytest.mark.integration

RLS_VIOLATION = "new row violates row-level security policy"


@dataclass
class World:
    """An owner with a job, an image and a usage row, and another user with a job of their own."""

    conn: psycopg.Connection[Any]
    owner: uuid.UUID
    other: uuid.UUID
    owner_job: uuid.UUID
    other_job: uuid.UUID


@pytest.fixture
def world(db_url: str) -> Iterator[World]:
    owner, other = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(db_url) as conn:
        owner_job = _insert_job(conn, owner)
        other_job = _insert_job(conn, other)
        image = conn.execute(
            "insert into imagen.images (owner_user_id, job_id, bucket, path, mime, width, height, bytes,"
            " prompt, backend) values (%s, %s, 'imagen', %s, 'image/png', 64, 64, 100, 'a cat', 'mock')"
            " returning id",
            (owner, owner_job, f"{owner}/{owner_job}.png"),
        ).fetchone()
        assert image is not None
        conn.execute(
            "insert into imagen.usage (owner_user_id, job_id, backend, model, images, ok)"
            " values (%s, %s, 'mock', 'mock-1', 1, true)",
            (owner, owner_job),
        )
        conn.commit()
        yield World(conn, owner, other, owner_job, other_job)


def _insert_job(conn: psycopg.Connection[Any], owner: uuid.UUID, status: str = "pending") -> uuid.UUID:
    row = conn.execute(
        "insert into imagen.jobs (owner_user_id, prompt, status) values (%s, 'a cat', %s) returning id",
        (owner, status),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


@contextmanager
def as_user(conn: psycopg.Connection[Any], user: uuid.UUID) -> Iterator[psycopg.Connection[Any]]:
    """One PostgREST-style request as `authenticated` with `sub` = user; rolled back afterwards."""
    with conn.transaction(force_rollback=True):
        conn.execute("set local role authenticated")
        conn.execute(
            "select set_config('request.jwt.claims',"
            " json_build_object('sub', %s::text, 'role', 'authenticated')::text, true)",
            (str(user),),
        )
        yield conn


@contextmanager
def as_anon(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    with conn.transaction(force_rollback=True):
        conn.execute("set local role anon")
        conn.execute("select set_config('request.jwt.claims', json_build_object('role', 'anon')::text, true)")
        yield conn


def _status(world: World, job: uuid.UUID) -> str:
    row = world.conn.execute("select status from imagen.jobs where id = %s", (job,)).fetchone()
    world.conn.commit()
    assert row is not None
    return str(row[0])


def test_owner_reads_own_jobs_images_and_usage(world: World) -> None:
    with as_user(world.conn, world.owner) as conn:
        jobs = conn.execute("select id from imagen.jobs").fetchall()
        images = conn.execute("select job_id from imagen.images").fetchall()
        usage = conn.execute("select job_id from imagen.usage").fetchall()
    assert jobs == [(world.owner_job,)]
    assert images == [(world.owner_job,)]
    assert usage == [(world.owner_job,)]


def test_other_user_sees_none_of_the_owners_rows(world: World) -> None:
    with as_user(world.conn, world.other) as conn:
        jobs = conn.execute("select id from imagen.jobs").fetchall()
        looked_up = conn.execute("select id from imagen.jobs where id = %s", (world.owner_job,)).fetchall()
        images = conn.execute("select id from imagen.images").fetchall()
        usage = conn.execute("select id from imagen.usage").fetchall()
    assert jobs == [(world.other_job,)]
    assert looked_up == []
    assert images == []
    assert usage == []


def test_request_without_a_user_sees_nothing(world: World) -> None:
    with world.conn.transaction(force_rollback=True):
        world.conn.execute("set local role authenticated")
        assert world.conn.execute("select id from imagen.jobs").fetchall() == []


def test_other_user_cannot_insert_a_job_for_the_owner(world: World) -> None:
    with (
        pytest.raises(errors.InsufficientPrivilege, match=RLS_VIOLATION),
        as_user(world.conn, world.other) as conn,
    ):
        conn.execute(
            "insert into imagen.jobs (owner_user_id, prompt) values (%s, 'on your bill')", (world.owner,)
        )


def test_other_user_cannot_cancel_the_owners_job(world: World) -> None:
    with as_user(world.conn, world.other) as conn:
        cursor = conn.execute("update imagen.jobs set status = 'cancelled' where id = %s", (world.owner_job,))
        assert cursor.rowcount == 0
    assert _status(world, world.owner_job) == "pending"


def test_cancel_policy_alone_keeps_other_users_rows_out(world: World) -> None:
    # No WHERE clause, so the select policy does not apply: only the cancel policy's
    # USING keeps the owner's row out of the update.
    with as_user(world.conn, world.other) as conn:
        cursor = conn.execute("update imagen.jobs set status = 'cancelled'")
        assert cursor.rowcount == 1
    assert _status(world, world.owner_job) == "pending"


def test_owner_insert_without_owner_gets_auth_uid(world: World) -> None:
    with as_user(world.conn, world.owner) as conn:
        row = conn.execute(
            "insert into imagen.jobs (prompt, params) values ('a dog', '{\"seed\": 7}')"
            " returning owner_user_id, status, attempt"
        ).fetchone()
    assert row == (world.owner, "pending", 0)


def test_owner_cannot_choose_a_job_id(world: World) -> None:
    # Ids are the server's (issue 14, sql/006_job_ownership.sql): test_rls_adversarial.py has the attacks.
    with (
        pytest.raises(errors.InsufficientPrivilege, match="permission denied for table jobs"),
        as_user(world.conn, world.owner) as conn,
    ):
        conn.execute(
            "insert into imagen.jobs (id, owner_user_id, prompt, params) values (%s, %s, 'a dog', '{}')",
            (uuid.uuid4(), world.owner),
        )


def test_owner_cannot_insert_a_job_with_status_done(world: World) -> None:
    with (
        pytest.raises(errors.InsufficientPrivilege, match="permission denied for table jobs"),
        as_user(world.conn, world.owner) as conn,
    ):
        conn.execute("insert into imagen.jobs (prompt, status) values ('a dog', 'done')")


def test_insert_policy_requires_pending_even_if_status_were_granted(world: World) -> None:
    # The column grant is the first wall; the policy's `status = 'pending'` is the second.
    with (
        pytest.raises(errors.InsufficientPrivilege, match=RLS_VIOLATION),
        world.conn.transaction(force_rollback=True),
    ):
        world.conn.execute("grant insert (status) on imagen.jobs to authenticated")
        with as_user(world.conn, world.owner) as conn:
            conn.execute("insert into imagen.jobs (prompt, status) values ('a dog', 'done')")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("attempt", "5"),
        ("error", "'none'"),
        ("last_error", "'none'"),
        ("image_id", "gen_random_uuid()"),
        ("stage", "'generating'"),
        ("claimed_at", "now()"),
        ("heartbeat_at", "now()"),
        ("finished_at", "now()"),
        ("stage_times", "'{}'"),
        ("created_at", "now()"),
        ("updated_at", "now()"),
    ],
)
def test_owner_cannot_set_worker_columns_on_insert(world: World, column: str, value: str) -> None:
    with (
        pytest.raises(errors.InsufficientPrivilege, match="permission denied for table jobs"),
        as_user(world.conn, world.owner) as conn,
    ):
        conn.execute(f"insert into imagen.jobs (prompt, {column}) values ('a dog', {value})")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("attempt", "5"),
        ("error", "'none'"),
        ("image_id", "gen_random_uuid()"),
        ("stage", "'generating'"),
        ("claimed_at", "now()"),
        ("prompt", "'something else'"),
        ("owner_user_id", "gen_random_uuid()"),
    ],
)
def test_owner_cannot_update_any_column_but_status(world: World, column: str, value: str) -> None:
    with (
        pytest.raises(errors.InsufficientPrivilege, match="permission denied for table jobs"),
        as_user(world.conn, world.owner) as conn,
    ):
        conn.execute(f"update imagen.jobs set {column} = {value} where id = %s", (world.owner_job,))


@pytest.mark.parametrize("status", ["pending", "running"])
def test_owner_can_cancel_own_pending_or_running_job(world: World, status: str) -> None:
    job = _insert_job(world.conn, world.owner, status)
    world.conn.commit()
    with as_user(world.conn, world.owner) as conn:
        cursor = conn.execute("update imagen.jobs set status = 'cancelled' where id = %s", (job,))
        assert cursor.rowcount == 1
        row = conn.execute("select status, finished_at is not null from imagen.jobs where id = %s", (job,))
        assert row.fetchone() == ("cancelled", True)


@pytest.mark.parametrize("status", ["done", "failed", "cancelled"])
def test_owner_cannot_cancel_a_finished_job(world: World, status: str) -> None:
    job = _insert_job(world.conn, world.owner, status)
    world.conn.commit()
    with as_user(world.conn, world.owner) as conn:
        cursor = conn.execute("update imagen.jobs set status = 'cancelled' where id = %s", (job,))
        assert cursor.rowcount == 0
    assert _status(world, job) == status


@pytest.mark.parametrize("status", ["done", "failed", "running", "pending"])
def test_owner_cannot_set_any_status_but_cancelled(world: World, status: str) -> None:
    with (
        pytest.raises(errors.InsufficientPrivilege, match=RLS_VIOLATION),
        as_user(world.conn, world.owner) as conn,
    ):
        conn.execute("update imagen.jobs set status = %s where id = %s", (status, world.owner_job))


def test_owner_cannot_delete_own_job(world: World) -> None:
    with (
        pytest.raises(errors.InsufficientPrivilege, match="permission denied for table jobs"),
        as_user(world.conn, world.owner) as conn,
    ):
        conn.execute("delete from imagen.jobs where id = %s", (world.owner_job,))


@pytest.mark.parametrize("table", ["images", "usage"])
def test_owner_cannot_write_images_or_usage(world: World, table: str) -> None:
    with (
        pytest.raises(errors.InsufficientPrivilege, match=f"permission denied for table {table}"),
        as_user(world.conn, world.owner) as conn,
    ):
        conn.execute(f"delete from imagen.{table}")


@pytest.mark.parametrize(
    "statement",
    [
        "select * from imagen.jobs",
        "select * from imagen.images",
        "select * from imagen.usage",
        "insert into imagen.jobs (owner_user_id, prompt) values (gen_random_uuid(), 'a cat')",
    ],
)
def test_anon_is_refused_the_schema(world: World, statement: str) -> None:
    with (
        pytest.raises(errors.InsufficientPrivilege, match="permission denied for schema imagen"),
        as_anon(world.conn) as conn,
    ):
        conn.execute(statement)


def test_service_role_bypasses_rls(world: World) -> None:
    with world.conn.transaction(force_rollback=True):
        world.conn.execute("set local role service_role")
        jobs = world.conn.execute("select count(*) from imagen.jobs").fetchone()
        cursor = world.conn.execute(
            "update imagen.jobs set status = 'running', attempt = attempt + 1 where id = %s",
            (world.owner_job,),
        )
        assert jobs == (2,)
        assert cursor.rowcount == 1
