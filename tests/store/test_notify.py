"""The listener's connections: its LISTEN wakes it and proves it still listens, and its claims run on one
connection of its own (PostgreSQL only: LISTEN and sessions are the server's)."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import psycopg
import pytest

from imagen.store import PostgresJobStore
from imagen.store.notify import CONNECTION_LOST, LISTEN_SQL, PostgresNotifier, SessionJobStore
from tests.waiting import wait_until

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
        with pytest.raises(CONNECTION_LOST, match=r"^LISTEN registration missing$"):
            notifier.check()
    finally:
        notifier.close()


OWNER = UUID("00000000-0000-4000-8000-0000000000ab")


def test_a_wait_wakes_for_the_jobs_inserted_before_it_and_times_out_when_none_came(db_url: str) -> None:
    notifier = PostgresNotifier(db_url)
    try:
        assert notifier.wait(0.05) is False
        other = PostgresJobStore.from_url(db_url)
        for prompt in ("a fox", "a hare", "an owl"):
            other.submit_job(OWNER, prompt, {})  # one notification each, on commit

        assert notifier.wait(10) is True
        # A wake-up drains what is buffered (the rest may still be on its way): the waits run dry.
        wait_until(lambda: notifier.wait(0.05) is False, timeout=10, message="the notifications drained")
    finally:
        notifier.close()
    assert notifier.conn.closed


def test_the_listeners_store_runs_every_call_on_its_one_named_connection_and_commits_each(
    db_url: str,
) -> None:
    store = SessionJobStore(db_url, "imagen-listener-claims")
    try:
        assert store.conn.info.parameter_status("application_name") == "imagen-listener-claims"
        job_id = store.submit_job(OWNER, "a fox", {})
        (claim,) = store.claim_jobs(1)
        with store.connect() as conn:
            assert conn is store.conn
        store.count_running()
        # Between calls the session is idle, not idle in a transaction that would pin a snapshot.
        assert store.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with psycopg.connect(db_url) as other:  # committed: another session sees the claim
            row = other.execute("SELECT status, attempt FROM imagen.jobs WHERE id = %s", (job_id,)).fetchone()
        assert row == ("running", claim.attempt)
    finally:
        store.close()
    assert store.conn.closed
    store.close()  # a second close is quiet


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
