"""The conformance suite's two stores: every test in tests/store runs on both (River's driver tests).

A `Harness` gives a test the store plus what only a test may do: age a lease,
move a job's times into the past, and read the images and usage rows the store wrote.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol
from uuid import UUID

import psycopg
import pytest

from imagen.store import InMemoryJobStore, JobStore, PostgresJobStore

# The job's timestamps a test may move (updated_at is the trigger's, and moves on PostgreSQL anyway).
TIMESTAMPS = ("created_at", "claimed_at", "heartbeat_at", "finished_at", "pending_at", "image_swept_at")


class Harness(Protocol):
    store: JobStore

    def age_heartbeat(self, job_id: UUID, seconds: float) -> None: ...

    def backdate(self, job_id: UUID, seconds: float, *columns: str) -> None:
        """Move the job's `columns` (every timestamp it has set when none is named) `seconds` back."""
        ...

    def images(self, job_id: UUID) -> list[dict[str, Any]]: ...

    def usage_call_ids(self) -> list[UUID]: ...

    def usage_row(self, call_id: UUID) -> dict[str, Any]:
        """The usage row of a call, by UsageRecord's field names."""
        ...

    def set_quota(self, owner: UUID, daily_images: int | None, daily_cost_usd: float | None) -> None: ...


class MemoryHarness:
    def __init__(self) -> None:
        self.memory = InMemoryJobStore()
        self.store: JobStore = self.memory

    def age_heartbeat(self, job_id: UUID, seconds: float) -> None:
        from datetime import timedelta

        row = self.memory.jobs[job_id]
        row["heartbeat_at"] -= timedelta(seconds=seconds)

    def backdate(self, job_id: UUID, seconds: float, *columns: str) -> None:
        from datetime import timedelta

        row = self.memory.jobs[job_id]
        for column in columns or TIMESTAMPS:
            if row[column] is not None:
                row[column] -= timedelta(seconds=seconds)

    def images(self, job_id: UUID) -> list[dict[str, Any]]:
        return [dict(i) for i in self.memory.images.values() if i["job_id"] == job_id]

    def usage_call_ids(self) -> list[UUID]:
        return sorted(self.memory.usage)

    def usage_row(self, call_id: UUID) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self.memory.usage[call_id])

    def set_quota(self, owner: UUID, daily_images: int | None, daily_cost_usd: float | None) -> None:
        self.memory.quotas[owner] = (daily_images, daily_cost_usd)


class PostgresHarness:
    def __init__(self, url: str) -> None:
        self.url = url
        self.store: JobStore = PostgresJobStore.from_url(url)

    def _rows(self, query: Any, params: Any = None) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(query, params).fetchall()

    def age_heartbeat(self, job_id: UUID, seconds: float) -> None:
        self._rows(
            "UPDATE imagen.jobs SET heartbeat_at = heartbeat_at - make_interval(secs => %s) WHERE id = %s"
            " RETURNING id",
            (seconds, job_id),
        )

    def backdate(self, job_id: UUID, seconds: float, *columns: str) -> None:
        from psycopg import sql

        moved = [
            sql.SQL("{0} = {0} - make_interval(secs => %(s)s)").format(sql.Identifier(c))
            for c in columns or TIMESTAMPS
        ]
        statement = sql.SQL("UPDATE imagen.jobs SET {} WHERE id = %(id)s RETURNING id").format(
            sql.SQL(", ").join(moved)
        )
        self._rows(statement, {"s": seconds, "id": job_id})

    def images(self, job_id: UUID) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM imagen.images WHERE job_id = %s", (job_id,))

    def usage_call_ids(self) -> list[UUID]:
        return sorted(r["call_id"] for r in self._rows("SELECT call_id FROM imagen.usage"))

    def usage_row(self, call_id: UUID) -> dict[str, Any]:
        import dataclasses

        from psycopg import sql

        from imagen.usage import UsageRecord

        names = [f.name for f in dataclasses.fields(UsageRecord)]
        query = sql.SQL("SELECT {} FROM imagen.usage WHERE call_id = %s").format(
            sql.SQL(", ").join(map(sql.Identifier, names))
        )
        (row,) = self._rows(query, (call_id,))
        return row

    def set_quota(self, owner: UUID, daily_images: int | None, daily_cost_usd: float | None) -> None:
        self._rows(
            "INSERT INTO imagen.owner_quotas (owner_user_id, daily_images, daily_cost_usd) VALUES (%s, %s, %s)"
            " RETURNING owner_user_id",
            (owner, daily_images, daily_cost_usd),
        )


@pytest.fixture(params=["memory", pytest.param("postgres", marks=pytest.mark.integration)])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    if request.param == "memory":
        yield MemoryHarness()
    else:
        yield PostgresHarness(request.getfixturevalue("db_url"))


@pytest.fixture
def store(harness: Harness) -> JobStore:
    return harness.store
