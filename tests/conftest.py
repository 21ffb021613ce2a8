"""Fixtures for real servers: throwaway PostgreSQL and Redis started from the binaries on PATH.

Set IMAGEN_TEST_DATABASE_URL (an admin connection to a server where the tests may
create databases) or IMAGEN_TEST_REDIS_URL to use existing servers instead, and
IMAGEN_TEST_TEMPLATE_DB to reuse a migrated template database on that server.
Each test that asks for `db_url` gets a fresh database copied from a migrated
template; each test that asks for `redis_url` gets a flushed Redis.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from imagen.devtools.servers import PostgresServer, RedisServer


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """An admin connection string to a PostgreSQL server the tests own."""
    external = os.environ.get("IMAGEN_TEST_DATABASE_URL")
    if external:
        yield external
        return
    server = PostgresServer()
    server.start()
    try:
        yield server.url
    finally:
        server.cleanup()


def _db_url(admin_url: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(admin_url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> str:
    """A database with every migration applied, used as the template for per-test databases.

    IMAGEN_TEST_TEMPLATE_DB names one already migrated on IMAGEN_TEST_DATABASE_URL's server
    (scripts/mutation.py: each mutant's short session would migrate one again otherwise).
    """
    from imagen import db

    existing = os.environ.get("IMAGEN_TEST_TEMPLATE_DB")
    if existing and os.environ.get("IMAGEN_TEST_DATABASE_URL"):
        return existing
    name = f"imagen_tpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db.migrate(_db_url(pg_admin_url, name))
    return name


@pytest.fixture
def fresh_db_url(pg_admin_url: str) -> Iterator[str]:
    """An empty database (no migrations), dropped afterwards."""
    name = f"imagen_empty_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield _db_url(pg_admin_url, name)
    _drop(pg_admin_url, name)


@pytest.fixture
def db_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, fully migrated database for one test."""
    name = f"imagen_t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield _db_url(pg_admin_url, name)
    _drop(pg_admin_url, name)


def _drop(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    external = os.environ.get("IMAGEN_TEST_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def redis_url(redis_server_url: str) -> str:
    """A Redis with nothing in it."""
    import redis

    client = redis.Redis.from_url(redis_server_url)
    client.flushdb()
    client.close()
    return redis_server_url
