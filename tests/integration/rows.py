"""Reading rows back in integration tests, each on its own autocommit connection (what a user would see)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from imagen import jobs


def query(db_url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def scalar(db_url: str, sql: str, *args: Any) -> Any:
    """The first column of the first row, or None when there is no row."""
    rows = query(db_url, sql, *args)
    return rows[0][0] if rows else None


def job_row(db_url: str, job_id: uuid.UUID) -> dict[str, Any] | None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return jobs.get_job(conn, job_id)
