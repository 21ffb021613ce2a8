"""The migrator against a real PostgreSQL: bookkeeping, the Supabase shim, refusals and error reports."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import psycopg
import pytest

from imagen import db

pytestmark = pytest.mark.integration

ALL = [
    "001_images.sql",
    "002_jobs.sql",
    "003_usage.sql",
    "004_security.sql",
    "005_running_index.sql",
    "006_job_ownership.sql",
    "007_exactly_once.sql",
    "008_pending_wakeup.sql",
    "009_usage_cost_basis.sql",
    "010_dashboard_indexes.sql",
    "011_admission.sql",
    "012_fair_rounds.sql",
    "014_params_size.sql",
    "015_claim_plan.sql",
    "016_stage_plan.sql",
    "017_fair_round_plan.sql",
]


def _scalar(url: str, query: str) -> object:
    with psycopg.connect(url) as conn:
        row = conn.execute(query).fetchone()
        assert row is not None
        return row[0]


@pytest.fixture
def sql_copy(tmp_path: Path) -> Path:
    """A private copy of the migrations that a test may edit."""
    target = tmp_path / "sql"
    shutil.copytree(db.sql_dir(), target)
    return target


def _create_supabase_roles(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """
            do $$
            begin
                if not exists (select 1 from pg_roles where rolname = 'anon') then
                    create role anon nologin noinherit;
                end if;
                if not exists (select 1 from pg_roles where rolname = 'authenticated') then
                    create role authenticated nologin noinherit;
                end if;
                if not exists (select 1 from pg_roles where rolname = 'service_role') then
                    create role service_role nologin noinherit bypassrls;
                end if;
            exception when duplicate_object or unique_violation then
                null;
            end
            $$
            """
        )


def test_migrate_applies_everything_once_then_nothing(fresh_db_url: str) -> None:
    lines: list[str] = []
    assert db.migrate(fresh_db_url, echo=lines.append) == ALL
    assert db.SHIM_MESSAGE in lines
    assert [f"applying {name}" for name in ALL] == [line for line in lines if line.startswith("applying")]

    again: list[str] = []
    assert db.migrate(fresh_db_url, echo=again.append) == []
    assert db.SHIM_MESSAGE not in again
    assert again == ["nothing to apply: the schema is up to date"]
    assert _scalar(fresh_db_url, "select count(*) from imagen.schema_migrations") == len(ALL)
    assert _scalar(fresh_db_url, "select to_regclass('imagen.jobs') is not null") is True


def test_migrate_records_version_name_and_file_checksum(fresh_db_url: str) -> None:
    db.migrate(fresh_db_url)
    with psycopg.connect(fresh_db_url) as conn:
        rows = conn.execute(
            "select version, name, checksum, applied_at from imagen.schema_migrations order by version"
        ).fetchall()
    expected = {m.name: m.checksum for m in db.load_migrations()}
    assert [(v, n) for v, n, _, _ in rows] == [(name[:3], name) for name in ALL]
    assert {n: c for _, n, c, _ in rows} == expected
    assert all(applied_at is not None for *_, applied_at in rows)


def test_shim_creates_roles_and_auth_functions_like_supabase(fresh_db_url: str) -> None:
    db.migrate(fresh_db_url)
    user = "6f1c1f5e-5d0b-4c31-8f8e-0e7f2f4f6a11"
    with psycopg.connect(fresh_db_url) as conn:
        roles = dict(
            conn.execute(
                "select rolname, rolbypassrls from pg_roles"
                " where rolname in ('anon', 'authenticated', 'service_role')"
            ).fetchall()
        )
        assert roles == {"anon": False, "authenticated": False, "service_role": True}
        conn.execute(
            "select set_config('request.jwt.claims', json_build_object('sub', %s::text, 'role', 'authenticated')::text, true)",
            (user,),
        )
        row = conn.execute("select auth.uid()::text, auth.role(), auth.jwt() ->> 'sub'").fetchone()
        assert row == (user, "authenticated", user)
        conn.rollback()
        # After the transaction the setting reverts to '' and must read as "no user", not fail.
        assert conn.execute("select auth.uid(), auth.role(), auth.jwt()").fetchone() == (None, None, None)
        conn.execute("select set_config('request.jwt.claim.sub', %s, true)", (user,))
        assert conn.execute("select auth.uid()::text").fetchone() == (user,)


def test_shim_is_skipped_where_auth_uid_exists(fresh_db_url: str) -> None:
    _create_supabase_roles(fresh_db_url)
    with psycopg.connect(fresh_db_url, autocommit=True) as conn:
        conn.execute("create schema auth")
        conn.execute(
            "create function auth.uid() returns uuid language sql stable as"
            " $$ select (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')::uuid $$"
        )
        conn.execute("grant usage on schema auth to authenticated")

    lines: list[str] = []
    assert db.migrate(fresh_db_url, echo=lines.append) == ALL
    assert db.SHIM_MESSAGE not in lines
    # The shim would have created auth.role(); this database keeps only what it had.
    assert _scalar(fresh_db_url, "select to_regprocedure('auth.role()') is null") is True


def test_status_reports_pending_applied_changed_and_missing(fresh_db_url: str, sql_copy: Path) -> None:
    before = db.status(fresh_db_url, sql_dir=sql_copy)
    assert [(s.name, s.state, s.applied_at) for s in before] == [(name, "pending", None) for name in ALL]
    # status only reads: it must not have created the bookkeeping table.
    assert _scalar(fresh_db_url, "select to_regclass('imagen.schema_migrations') is null") is True

    db.migrate(fresh_db_url, sql_dir=sql_copy)
    after = db.status(fresh_db_url, sql_dir=sql_copy)
    assert [s.state for s in after] == ["applied"] * len(ALL)
    assert all(s.applied_at is not None for s in after)

    with (sql_copy / "003_usage.sql").open("a") as f:
        f.write("\n-- an edit after the fact\n")
    (sql_copy / "004_security.sql").unlink()
    (sql_copy / "099_next.sql").write_text("create table imagen.next_thing (id int);\n")
    states = {s.name: s.state for s in db.status(fresh_db_url, sql_dir=sql_copy)}
    assert states == {
        "001_images.sql": "applied",
        "002_jobs.sql": "applied",
        "003_usage.sql": "changed",
        "004_security.sql": "missing",
        "005_running_index.sql": "applied",
        "006_job_ownership.sql": "applied",
        "007_exactly_once.sql": "applied",
        "008_pending_wakeup.sql": "applied",
        "009_usage_cost_basis.sql": "applied",
        "010_dashboard_indexes.sql": "applied",
        "011_admission.sql": "applied",
        "012_fair_rounds.sql": "applied",
        "014_params_size.sql": "applied",
        "015_claim_plan.sql": "applied",
        "016_stage_plan.sql": "applied",
        "017_fair_round_plan.sql": "applied",
        "099_next.sql": "pending",
    }


def test_migrate_refuses_when_an_applied_migration_changed(fresh_db_url: str, sql_copy: Path) -> None:
    db.migrate(fresh_db_url, sql_dir=sql_copy)
    jobs = sql_copy / "002_jobs.sql"
    jobs.write_text(jobs.read_text() + "\ncomment on table imagen.jobs is 'edited';\n")
    (sql_copy / "099_next.sql").write_text("create table imagen.next_thing (id int);\n")

    with pytest.raises(db.MigrationError, match=r"migration 002_jobs\.sql was changed after it was applied"):
        db.migrate(fresh_db_url, sql_dir=sql_copy)
    # Nothing after the refusal ran.
    assert _scalar(fresh_db_url, "select to_regclass('imagen.next_thing') is null") is True


def test_broken_migration_names_file_line_and_statement(fresh_db_url: str, sql_copy: Path) -> None:
    (sql_copy / "099_broken.sql").write_text(
        "-- a migration with a typo\n"
        "create table imagen.first_half (id int);\n"
        "\n"
        "create tabel imagen.second_half (\n"
        "    id int\n"
        ");\n"
    )
    with pytest.raises(db.MigrationError) as raised:
        db.migrate(fresh_db_url, sql_dir=sql_copy)
    message = str(raised.value)
    assert message.startswith('migration 099_broken.sql failed at line 4: syntax error at or near "tabel"')
    assert "(statement: create tabel imagen.second_half ( id int ))" in message
    assert isinstance(raised.value.__cause__, psycopg.errors.SyntaxError)

    # The good migrations stay applied; the broken one left nothing behind and is still pending.
    assert _scalar(fresh_db_url, "select to_regclass('imagen.first_half') is null") is True
    states = {s.name: s.state for s in db.status(fresh_db_url, sql_dir=sql_copy)}
    assert states["004_security.sql"] == "applied"
    assert states["099_broken.sql"] == "pending"


def test_runtime_error_names_the_statement_and_its_position(fresh_db_url: str, sql_copy: Path) -> None:
    (sql_copy / "099_missing.sql").write_text(
        "create table imagen.ok (id int);\ninsert into imagen.ok select id from imagen.nowhere;\n"
    )
    with pytest.raises(db.MigrationError) as raised:
        db.migrate(fresh_db_url, sql_dir=sql_copy)
    assert str(raised.value) == (
        'migration 099_missing.sql failed at line 2: relation "imagen.nowhere" does not exist'
        " (statement: insert into imagen.ok select id from imagen.nowhere)"
    )


def test_concurrent_migrators_apply_each_migration_once(fresh_db_url: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def run() -> None:
        start.wait()
        try:
            results.append(db.migrate(fresh_db_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(name for applied in results for name in applied) == ALL
    assert _scalar(fresh_db_url, "select count(*) from imagen.schema_migrations") == len(ALL)


def test_bad_migration_file_name_is_refused(sql_copy: Path) -> None:
    (sql_copy / "five_things.sql").write_text("select 1;\n")
    with pytest.raises(db.MigrationError, match=r"five_things\.sql: a migration's name must be"):
        db.load_migrations(sql_copy)


def test_duplicate_migration_number_is_refused(sql_copy: Path) -> None:
    (sql_copy / "002_other.sql").write_text("select 1;\n")
    with pytest.raises(db.MigrationError, match=r"002_jobs\.sql and 002_other\.sql have the same number"):
        db.load_migrations(sql_copy)


def test_sql_dir_holds_the_shim_and_the_migrations() -> None:
    folder = db.sql_dir()
    assert (folder / db.SHIM_NAME).is_file()
    assert [m.name for m in db.load_migrations(folder)] == ALL


def test_split_statements_respects_quotes_comments_and_dollar_bodies() -> None:
    script = (
        "-- leading comment; not a statement\n"
        "select 'a;b', E'it\\'s;', \"odd;name\" from t;\n"
        "/* block ; /* nested ; */ still comment */\n"
        "do $$ begin perform 1; end $$;\n"
        "create function f() returns int language sql as $body$ select 1; $body$;\n"
        "select $1, a$b from t\n"
        "-- trailing comment only;\n"
    )
    statements = [text.strip() for _, text in db.split_statements(script)]
    assert statements[0].endswith("select 'a;b', E'it\\'s;', \"odd;name\" from t")
    assert statements[1].endswith("do $$ begin perform 1; end $$")
    assert statements[2] == "create function f() returns int language sql as $body$ select 1; $body$"
    assert statements[3].startswith("select $1, a$b from t")
    assert len(statements) == 4
    offset, text = db.split_statements(script)[2]
    assert script[offset : offset + len(text)] == text
