"""Database connections and the schema migrator for the numbered SQL files in sql/.

`migrate` applies each pending migration once, in its own transaction, records
it in `imagen.schema_migrations` with the file's sha256, and serialises
concurrent migrators with an advisory lock. On plain PostgreSQL it first applies
the Supabase shim (`000_supabase_shim.sql`), only where `auth.uid()` is missing.
It must never re-run or silently accept an applied migration whose file changed:
a migration is fixed once applied, and changes go into a new numbered file.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict

from imagen.errors import ConfigError, ImagenError, NotReachable, SchemaNotReady
from imagen.sql_script import split_statements
from imagen.store.queries import QUERIES

SHIM_NAME = "000_supabase_shim.sql"
"""Creates what Supabase provides (roles, auth.uid()); not a numbered migration."""

SHIM_MESSAGE = "auth.uid() not found: applying the Supabase shim for plain PostgreSQL"

# One key for every imagen migrator of a database: "imagen" as a bigint.
_LOCK_KEY = int.from_bytes(b"imagen", "big")
_MIGRATION_NAME = re.compile(r"^(?P<version>\d+)_[A-Za-z0-9_.-]+\.sql$")
_STATEMENT_PREVIEW = 240

# Defaults for every imagen connection; a value in the conninfo, the matching libpq
# environment variable or a keyword argument wins. Keepalives let a LISTEN
# connection notice a dead peer in about a minute instead of the kernel's hours.
_CONNECT_DEFAULTS: dict[str, tuple[str | None, object]] = {
    "application_name": ("PGAPPNAME", "imagen"),
    "connect_timeout": ("PGCONNECT_TIMEOUT", 10),
    "keepalives": (None, 1),
    "keepalives_idle": (None, 30),
    "keepalives_interval": (None, 10),
    "keepalives_count": (None, 3),
    # A query on a silently dead TCP path fails after 30 s instead of ~15 min of retransmissions:
    # the listener's self-check then reconnects instead of stalling.
    "tcp_user_timeout": (None, 30_000),
}

# The migrator's own statements on imagen.schema_migrations: imagen/store/migrations.sql.
_BOOKKEEPING = QUERIES["create_schema_migrations"]

MigrationState = Literal["applied", "pending", "changed", "missing"]

MIGRATE_HINT = "run `imagen db migrate`"

# What libpq and the server say when the connection string names something that is not there, or
# credentials that do not hold: a restart cannot fix those, unlike a server that is down. libpq gives
# no SQLSTATE for a failed connection, only its text (always English from libpq itself; the server's
# FATAL lines follow its lc_messages, which is English on Supabase and in the default locale).
_CONFIG_FAILURES = (
    (re.compile(r'database "[^"]*" does not exist'), "unknown database"),
    (re.compile(r'role "[^"]*" does not exist'), "unknown role"),
    (re.compile(r"password authentication failed|no password supplied|SCRAM"), "wrong credentials"),
    (re.compile(r"Tenant or user not found", re.IGNORECASE), "unknown Supavisor tenant or user"),
    (re.compile(r"no pg_hba\.conf entry"), "the server refuses this host or user (pg_hba.conf)"),
    (re.compile(r"invalid \w+ value|invalid connection option|invalid URI|missing \"=\""), "bad URL"),
)
# Statements that name what only a migrated schema has.
_SCHEMA_MISSING = ("42P01", "3F000", "42703", "42883")  # undefined table, schema, column, function


class MigrationError(ImagenError):
    """A migration could not be applied, or the applied schema disagrees with the files."""


@dataclass(frozen=True)
class Migration:
    """One numbered SQL file."""

    version: str
    name: str
    sql: str
    checksum: str


@dataclass(frozen=True)
class MigrationStatus:
    """Where one migration stands in a database.

    `state` is 'applied', 'pending' (not yet applied), 'changed' (applied, but the
    file's checksum differs from the recorded one: `migrate` refuses to run) or
    'missing' (recorded as applied, but no such file exists here). `checksum` is
    the file's, or the recorded one for a missing file.
    """

    name: str
    checksum: str
    applied_at: datetime | None
    state: MigrationState


def connect(conninfo: str, **kwargs: Any) -> psycopg.Connection[Any]:
    """Open a connection with imagen's defaults: application_name, connect timeout, TCP keepalives.

    `kwargs` go to `psycopg.connect` (for example `autocommit=True`) and override the defaults.
    A connection string that does not parse is a ConfigError; connecting raises psycopg's errors.
    """
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise describe_error(exc) from None
    for key, (env, value) in _CONNECT_DEFAULTS.items():
        if key not in given and not (env and os.environ.get(env)):
            kwargs.setdefault(key, value)
    return psycopg.connect(conninfo, **kwargs)


def describe_error(exc: psycopg.Error, what: str = "database") -> ImagenError:
    """One readable line for a psycopg error, typed for the exit code and for whether to retry.

    A connection string or credentials that cannot work, or a schema that was never
    migrated, is a ConfigError (exit 78: fix the configuration); a server that does not
    answer or a dropped connection is NotReachable (exit 75: a retry may help).
    """
    first = _first_line(exc)
    if exc.sqlstate in _SCHEMA_MISSING:
        return SchemaNotReady(f"the {what} lacks imagen's schema ({first}): {MIGRATE_HINT}")
    if exc.sqlstate == "42501":
        return ConfigError(f"{what} error: {first} (the role in IMAGEN_DATABASE_URL lacks a privilege)")
    if isinstance(exc, psycopg.ProgrammingError) and exc.sqlstate is None:
        return ConfigError(f"IMAGEN_DATABASE_URL is not a valid connection string: {first}")
    if exc.sqlstate == "22023" and re.search(r'role "(authenticated|anon|service_role)"', first):
        return SchemaNotReady(f"the {what} lacks the Supabase roles ({first}): {MIGRATE_HINT}")
    for pattern, kind in _CONFIG_FAILURES if exc.sqlstate is None else ():
        if pattern.search(str(exc)):
            return ConfigError(f"{what} refused the connection ({kind}): {first}; check IMAGEN_DATABASE_URL")
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return NotReachable(f"{what} error: {first}")
    return ImagenError(f"{what} error: {first}")


def _first_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines()[:1])
    return text.removeprefix("connection failed: ") or type(exc).__name__


def check_schema(conn: psycopg.Connection[Any], *, sql_dir: Path | None = None) -> None:
    """Raise SchemaNotReady unless every migration this code ships is applied.

    A database with migrations newer than these files is fine (an older host during
    an upgrade); one without some of them would fail on its first statement instead.
    """
    exists = conn.execute(QUERIES["schema_migrations_exists"]).fetchone()
    if not (exists and exists[0]):
        raise SchemaNotReady(f"the database has no imagen schema: {MIGRATE_HINT}")
    pending = [m.name for m in load_migrations(sql_dir) if m.version not in _recorded(conn)]
    if pending:
        raise SchemaNotReady(f"the database lacks migration(s) {', '.join(pending)}: {MIGRATE_HINT}")


def preflight(conninfo: str) -> ImagenError | None:
    """Check a worker can use this database: raise ConfigError if it never could (unknown database or
    role, wrong password, schema not migrated); return the problem if the server is merely down."""
    try:
        with connect(conninfo, autocommit=True) as conn:
            check_schema(conn)
    except psycopg.Error as exc:
        problem = describe_error(exc)
        if isinstance(problem, ConfigError):
            raise problem from None
        return problem
    return None


def sql_dir() -> Path:
    """The folder holding the migrations: inside the installed package, else the checkout's sql/."""
    return _default_sql_dir()


def _default_sql_dir() -> Path:
    packaged = resources.files("imagen") / "sql"
    if isinstance(packaged, Path) and (packaged / SHIM_NAME).is_file():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / "sql"
    if (checkout / SHIM_NAME).is_file():
        return checkout
    raise MigrationError(f"the SQL migrations were not found (looked in {packaged} and {checkout})")


def load_migrations(folder: Path | None = None) -> list[Migration]:
    """The numbered migrations in `folder` (default: `sql_dir()`), in the order they apply."""
    folder = folder if folder is not None else sql_dir()
    if not folder.is_dir():
        raise MigrationError(f"no such migrations folder: {folder}")
    found: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        if path.name == SHIM_NAME:
            continue
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: a migration's name must be NNN_description.sql")
        number = int(match["version"])
        if number in found:
            raise MigrationError(f"{found[number].name} and {path.name} have the same number")
        found[number] = _read(path, match["version"])
    return [found[number] for number in sorted(found)]


def migrate(
    conninfo: str, *, sql_dir: Path | None = None, echo: Callable[[str], None] | None = None
) -> list[str]:
    """Apply every pending migration, each in its own transaction; return the names applied.

    Safe to run twice (the second run applies nothing) and from several processes at
    once (an advisory lock serialises them). `echo` receives one line per step.
    Raises MigrationError naming the file (and the failing statement) when a
    migration fails, or when an applied migration's file has changed since.
    """
    folder = sql_dir if sql_dir is not None else _default_sql_dir()
    migrations = load_migrations(folder)
    say = echo or (lambda _line: None)
    applied: list[str] = []
    try:
        with connect(conninfo, autocommit=True) as conn:
            with conn.transaction():
                _lock(conn)
                conn.execute(_BOOKKEEPING)
                if _needs_shim(conn):
                    say(SHIM_MESSAGE)
                    shim = folder / SHIM_NAME
                    if not shim.is_file():
                        raise MigrationError(f"auth.uid() is missing and {shim} does not exist")
                    _run_script(conn, SHIM_NAME, shim.read_text(encoding="utf-8"))
            _refuse_changed(migrations, _recorded(conn))
            for migration in migrations:
                with conn.transaction():
                    _lock(conn)
                    # Re-read under the lock: another migrator may have applied it meanwhile.
                    recorded = _recorded(conn).get(migration.version)
                    if recorded is not None:
                        _refuse_changed([migration], {migration.version: recorded})
                        continue
                    say(f"applying {migration.name}")
                    _run_script(conn, migration.name, migration.sql)
                    conn.execute(
                        QUERIES["record_migration"],
                        {
                            "version": migration.version,
                            "name": migration.name,
                            "checksum": migration.checksum,
                        },
                    )
                applied.append(migration.name)
    except psycopg.OperationalError as exc:
        raise describe_error(exc) from None
    except psycopg.Error as exc:
        raise MigrationError(f"migrate failed: {_message(exc)}") from exc
    say(f"applied {len(applied)} migration(s)" if applied else "nothing to apply: the schema is up to date")
    return applied


def status(conninfo: str, *, sql_dir: Path | None = None) -> list[MigrationStatus]:
    """Each migration's state in the database, in order; changes nothing."""
    migrations = load_migrations(sql_dir)
    try:
        with connect(conninfo, autocommit=True) as conn:
            exists = conn.execute(QUERIES["schema_migrations_exists"]).fetchone()
            recorded = _recorded(conn) if exists and exists[0] else {}
    except psycopg.OperationalError as exc:
        raise describe_error(exc) from None
    except psycopg.Error as exc:
        raise MigrationError(f"status failed: {_message(exc)}") from exc
    result: list[MigrationStatus] = []
    for migration in migrations:
        row = recorded.pop(migration.version, None)
        if row is None:
            result.append(MigrationStatus(migration.name, migration.checksum, None, "pending"))
        else:
            state: MigrationState = "applied" if row.checksum == migration.checksum else "changed"
            result.append(MigrationStatus(migration.name, migration.checksum, row.applied_at, state))
    for version in sorted(recorded, key=int):
        row = recorded[version]
        result.append(MigrationStatus(row.name, row.checksum, row.applied_at, "missing"))
    return result


def _read(path: Path, version: str) -> Migration:
    data = path.read_bytes()
    return Migration(version, path.name, data.decode("utf-8"), hashlib.sha256(data).hexdigest())


def _lock(conn: psycopg.Connection[Any]) -> None:
    conn.execute("select pg_advisory_xact_lock(%s)", (_LOCK_KEY,))


def _needs_shim(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("select to_regprocedure('auth.uid()') is null").fetchone()
    return bool(row and row[0])


@dataclass(frozen=True)
class _Recorded:
    name: str
    checksum: str
    applied_at: datetime


def _recorded(conn: psycopg.Connection[Any]) -> dict[str, _Recorded]:
    rows = conn.execute(QUERIES["recorded_migrations"])
    return {version: _Recorded(name, checksum, applied_at) for version, name, checksum, applied_at in rows}


def _refuse_changed(migrations: list[Migration], recorded: dict[str, _Recorded]) -> None:
    for migration in migrations:
        row = recorded.get(migration.version)
        if row is not None and row.checksum != migration.checksum:
            raise MigrationError(
                f"migration {migration.name} was changed after it was applied "
                f"(on {row.applied_at:%Y-%m-%d %H:%M} as {row.name}): "
                "restore the file and put the change in a new numbered migration"
            )


def _run_script(conn: psycopg.Connection[Any], name: str, text: str) -> None:
    """Run a script statement by statement, so a failure can name its statement and line."""
    for offset, statement in split_statements(text):
        try:
            conn.execute(statement)
        except psycopg.Error as exc:
            raise MigrationError(_describe_failure(name, text, offset, statement, exc)) from exc


def _describe_failure(name: str, text: str, offset: int, statement: str, exc: psycopg.Error) -> str:
    body = statement.lstrip()
    body_offset = offset + len(statement) - len(body)
    error_offset = body_offset
    position = exc.diag.statement_position
    if position and position.isdigit():
        # The server counts characters from 1 within the statement it was sent.
        error_offset = offset + int(position) - 1
    line = text.count("\n", 0, error_offset) + 1
    preview = " ".join(body.split())
    if len(preview) > _STATEMENT_PREVIEW:
        preview = preview[: _STATEMENT_PREVIEW - 3] + "..."
    return f"migration {name} failed at line {line}: {_message(exc)} (statement: {preview})"


def _message(exc: psycopg.Error) -> str:
    return exc.diag.message_primary or str(exc).strip() or type(exc).__name__
