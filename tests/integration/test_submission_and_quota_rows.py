"""Idempotent submission (jobs.client_key) and the owner_quotas table, as PostgREST runs a request.

Each request switches to `authenticated` with SET LOCAL ROLE and sets `request.jwt.claims`,
as tests/integration/test_rls.py does; the statements are the ones the UI sends.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import errors

pytestmark = pytest.mark.integration

# supabase-js `upsert(row, { onConflict: 'owner_user_id,client_key', ignoreDuplicates: true })`
# sends this through PostgREST (`Prefer: resolution=ignore-duplicates`).
UI_INSERT = """
INSERT INTO imagen.jobs (prompt, params, client_key) VALUES (%s, '{"backend": "mock"}', %s)
ON CONFLICT (owner_user_id, client_key) DO NOTHING
RETURNING id
"""


@contextmanager
def as_user(conn: psycopg.Connection[Any], user: uuid.UUID, role: str = "authenticated") -> Iterator[None]:
    """One PostgREST request as `role` with `sub` = user, committed at the end."""
    with conn.transaction():
        conn.execute(f"set local role {role}")
        conn.execute(
            "select set_config('request.jwt.claims', json_build_object('sub', %s::text, 'role', %s::text)::text, true)",
            (str(user), role),
        )
        yield


def jobs_of(conn: psycopg.Connection[Any], owner: uuid.UUID) -> list[tuple[Any, ...]]:
    return conn.execute(
        "select id, client_key, status from imagen.jobs where owner_user_id = %s", (owner,)
    ).fetchall()


def test_retried_ui_insert_with_the_same_client_key_creates_one_job(db_url: str) -> None:
    owner = uuid.uuid4()
    with psycopg.connect(db_url) as conn:
        with as_user(conn, owner):
            first = conn.execute(UI_INSERT, ("a cat", "key-1")).fetchall()
        with as_user(conn, owner):
            again = conn.execute(UI_INSERT, ("a cat", "key-1")).fetchall()
        assert len(first) == 1 and again == []
        rows = jobs_of(conn, owner)
        assert [(r[0], r[1], r[2]) for r in rows] == [(first[0][0], "key-1", "pending")]


def test_another_owner_may_use_the_same_client_key(db_url: str) -> None:
    owner, other = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(db_url) as conn:
        with as_user(conn, owner):
            mine = conn.execute(UI_INSERT, ("a cat", "shared")).fetchall()
        with as_user(conn, other):
            theirs = conn.execute(UI_INSERT, ("a dog", "shared")).fetchall()
        assert len(mine) == 1 and len(theirs) == 1 and mine != theirs
        assert len(jobs_of(conn, owner)) == 1 and len(jobs_of(conn, other)) == 1


def test_jobs_without_a_client_key_never_conflict(db_url: str) -> None:
    owner = uuid.uuid4()
    with psycopg.connect(db_url) as conn:
        for _ in range(2):
            with as_user(conn, owner):
                conn.execute(UI_INSERT, ("a cat", None)).fetchall()
        assert len(jobs_of(conn, owner)) == 2


def test_a_plain_insert_repeating_a_client_key_is_refused(db_url: str) -> None:
    owner = uuid.uuid4()
    plain = "INSERT INTO imagen.jobs (prompt, client_key) VALUES ('a cat', 'k')"
    with psycopg.connect(db_url) as conn:
        with as_user(conn, owner):
            conn.execute(plain)
        with pytest.raises(errors.UniqueViolation), as_user(conn, owner):
            conn.execute(plain)


def test_a_blank_or_huge_client_key_is_refused(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        for key in ("", "k" * 201):
            with pytest.raises(errors.CheckViolation), as_user(conn, uuid.uuid4()):
                conn.execute(UI_INSERT, ("a cat", key))


@pytest.fixture
def quotas(db_url: str) -> Iterator[tuple[psycopg.Connection[Any], uuid.UUID, uuid.UUID]]:
    owner, other = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "insert into imagen.owner_quotas (owner_user_id, daily_images, daily_cost_usd) values"
            " (%s, 10, 1.5), (%s, 99, null)",
            (owner, other),
        )
        conn.commit()
        yield conn, owner, other


def test_an_owner_reads_only_its_own_quota_row(quotas: Any) -> None:
    conn, owner, _ = quotas
    with as_user(conn, owner):
        rows = conn.execute("select owner_user_id, daily_images from imagen.owner_quotas").fetchall()
    assert rows == [(owner, 10)]


@pytest.mark.parametrize(
    "statement",
    [
        "insert into imagen.owner_quotas (owner_user_id, daily_images) values ({owner}, 1000)",
        "update imagen.owner_quotas set daily_images = 1000 where owner_user_id = {owner}",
        "delete from imagen.owner_quotas where owner_user_id = {owner}",
    ],
)
def test_an_owner_cannot_write_quota_rows(quotas: Any, statement: str) -> None:
    conn, owner, _ = quotas
    with pytest.raises(errors.InsufficientPrivilege), as_user(conn, owner):
        conn.execute(statement.format(owner=f"'{owner}'"))


def test_anon_cannot_read_quota_rows(quotas: Any) -> None:
    conn, owner, _ = quotas
    with pytest.raises(errors.InsufficientPrivilege), as_user(conn, owner, role="anon"):
        conn.execute("select * from imagen.owner_quotas").fetchall()


def test_service_role_writes_quota_rows(quotas: Any) -> None:
    conn, owner, _ = quotas
    with as_user(conn, owner, role="service_role"):
        conn.execute("update imagen.owner_quotas set daily_images = 20 where owner_user_id = %s", (owner,))
    assert conn.execute(
        "select daily_images from imagen.owner_quotas where owner_user_id = %s", (owner,)
    ).fetchone() == (20,)
