"""The store's PostgreSQL connections as the server sees them: the workers' pool and the operator's
one-per-call store (PostgreSQL only: these are the server's sessions)."""

from __future__ import annotations

from uuid import UUID

import psycopg
import pytest

from imagen.store import PostgresJobStore
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

OWNER = UUID("00000000-0000-4000-8000-0000000000aa")


def sessions(db_url: str, application_name: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
            (application_name,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_pooled_store_keeps_one_named_connection_open_grows_to_its_size_and_closes_them_all(
    db_url: str,
) -> None:
    store = PostgresJobStore.pooled(db_url, application_name="imagen-pool-test", max_size=3)
    assert store.pool is not None
    store.pool.wait(timeout=10)  # open from the start: the first call does not pay for a connection
    assert sessions(db_url, "imagen-pool-test") == 1

    job_id = store.submit_job(OWNER, "a fox", {})
    with psycopg.connect(db_url) as other:  # committed when the call returned: another session sees it
        assert other.execute("SELECT status FROM imagen.jobs WHERE id = %s", (job_id,)).fetchone() == (
            "pending",
        )
    with store.pool.connection(timeout=5), store.pool.connection(timeout=5), store.pool.connection(timeout=5):
        assert sessions(db_url, "imagen-pool-test") == 3
    with store.connect() as conn:
        assert conn.autocommit  # each statement commits alone; none holds a transaction open

    store.close()
    wait_until(lambda: sessions(db_url, "imagen-pool-test") == 0, message="the pool's sessions end")


def test_the_one_connection_per_call_store_is_named_imagen_and_commits_each_call(db_url: str) -> None:
    store = PostgresJobStore.from_url(db_url)
    with store.connect() as conn:
        assert conn.autocommit
        assert conn.info.parameter_status("application_name") == "imagen"
    named = PostgresJobStore.from_url(db_url, application_name="imagen-web")
    with named.connect() as conn:
        assert conn.info.parameter_status("application_name") == "imagen-web"


def test_after_the_server_dropped_the_pools_connections_recover_replaces_them_before_the_next_call(
    db_url: str,
) -> None:
    store = PostgresJobStore.pooled(db_url, application_name="imagen-pool-recover", max_size=2)
    assert store.pool is not None
    try:
        store.pool.wait(timeout=10)
        with psycopg.connect(
            db_url, autocommit=True
        ) as admin:  # a restart or a failover, as a worker sees it
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
                ("imagen-pool-recover",),
            )
        wait_until(lambda: sessions(db_url, "imagen-pool-recover") == 0, message="the pool's sessions end")

        store.recover(ValueError("not a connection error"))  # nothing to do for other errors
        store.recover(psycopg.OperationalError("server closed the connection unexpectedly"))

        assert store.count_running() == 0  # the next call draws a live connection
    finally:
        store.close()


def test_recover_is_a_no_op_for_a_store_without_a_pool(db_url: str) -> None:
    store = PostgresJobStore.from_url(db_url)

    store.recover(psycopg.OperationalError("server closed the connection unexpectedly"))

    assert store.count_running() == 0
    store.close()
