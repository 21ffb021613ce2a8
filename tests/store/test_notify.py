"""The listener's LISTEN connection proves it still listens (PostgreSQL only: LISTEN is the server's)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from imagen.store.notify import CONNECTION_LOST, LISTEN_SQL, PostgresNotifier

pytestmark = pytest.mark.integration


def test_the_health_check_passes_while_the_listen_holds_and_raises_once_it_is_gone(db_url: str) -> None:
    notifier = PostgresNotifier(db_url)
    try:
        notifier.check()  # LISTEN imagen_jobs is registered: nothing to report
        assert notifier.conn.info.parameter_status("application_name") == "imagen-listener"
        assert notifier.conn.autocommit

        # What a pooler that reset the session, or a server that lost it, leaves: a live
        # connection that no longer listens. The check must say so as a connection loss,
        # which the listener's loop answers by reconnecting (and listening again).
        notifier.conn.execute("UNLISTEN *")
        with pytest.raises(CONNECTION_LOST, match="LISTEN registration missing"):
            notifier.check()
    finally:
        notifier.close()


def test_the_listener_opens_its_listen_and_its_claims_under_the_session_names_operators_query(
    db_url: str, tmp_path: Path
) -> None:
    from imagen.config import load_settings
    from imagen.listener import Listener

    settings = load_settings(database_url=db_url, storage_dir=tmp_path, listener_metrics_port=0)
    listener = Listener(settings, broker=object())
    listener._connect()
    try:
        with psycopg.connect(db_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT application_name, query FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE 'imagen-listener%'"
            ).fetchall()
        assert sorted(name for name, _ in rows) == ["imagen-listener", "imagen-listener-claims"]
        assert [query for name, query in rows if name == "imagen-listener"] == [LISTEN_SQL]
    finally:
        listener._close()
