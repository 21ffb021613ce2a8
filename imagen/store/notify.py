"""The listener's database connections: LISTEN on imagen_jobs, and one connection for its claims.

The AFTER INSERT trigger calls `pg_notify('imagen_jobs', ...)` once per INSERT
statement; a notification only wakes the listener, which then drains the
backlog, so a lost one costs at most a safety poll. `CONNECTION_LOST` are the
errors that mean "reconnect" to the listener (it never imports psycopg).
"""

from __future__ import annotations

from contextlib import closing, nullcontext
from typing import Any

import psycopg

from imagen.store.postgres import PostgresJobStore

CHANNEL = "imagen_jobs"
LISTEN_SQL = f"LISTEN {CHANNEL}"
# The LISTEN connection runs only these two statements, so `imagen.devtools.runner.listeners_listening`
# and the dashboard find it in pg_stat_activity by its last query: application_name is no use for
# that, since Supavisor's session mode replaces it.
HEALTH_SQL = "SELECT count(*) FROM pg_listening_channels() c WHERE c = 'imagen_jobs'"
CONNECTION_LOST: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError)


class PostgresNotifier:
    """A dedicated connection holding LISTEN imagen_jobs."""

    def __init__(self, conninfo: str) -> None:
        from imagen.db import check_schema, connect

        self.conn: psycopg.Connection[Any] = connect(
            conninfo, autocommit=True, application_name="imagen-listener"
        )
        try:
            # Before anything else: a schema that was never migrated is a configuration error to
            # report (exit 78), not a connection to retry forever.
            check_schema(self.conn)
        except Exception:
            self.conn.close()
            raise
        # LISTEN before the catch-up claim: a row inserted in between is either seen by the
        # claim or announced by a notification, never missed by both.
        self.conn.execute(LISTEN_SQL)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` (keep it short: the caller checks for stop between waits) for a notification."""
        with closing(self.conn.notifies(timeout=timeout, stop_after=1)) as stream:
            got = next(stream, None)
        if got is None:
            return False
        # Swallow the notifications already buffered: one drain serves them all. (Not from
        # inside the first generator: it holds the connection's lock until it is closed.)
        for _ in self.conn.notifies(timeout=0):
            pass
        return True

    def check(self) -> None:
        """A half-open TCP connection can look alive for hours: prove the LISTEN still holds."""
        row = self.conn.execute(HEALTH_SQL).fetchone()
        if not row or row[0] != 1:
            raise psycopg.OperationalError("LISTEN registration missing")

    def close(self) -> None:
        _close_quietly(self.conn)


class SessionJobStore(PostgresJobStore):
    """A store over one connection it owns: the listener's claims, rescues and sweeps."""

    def __init__(self, conninfo: str, application_name: str) -> None:
        from imagen.db import connect

        self.conn: psycopg.Connection[Any] = connect(
            conninfo, autocommit=True, application_name=application_name
        )
        super().__init__(lambda: nullcontext(self.conn))

    def close(self) -> None:
        _close_quietly(self.conn)


def _close_quietly(conn: psycopg.Connection[Any]) -> None:
    try:
        conn.close()
    except psycopg.Error:
        pass
