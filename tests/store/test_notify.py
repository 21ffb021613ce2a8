"""The listener's LISTEN connection proves it still listens (PostgreSQL only: LISTEN is the server's)."""

from __future__ import annotations

import pytest

from imagen.store.notify import CONNECTION_LOST, PostgresNotifier

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
