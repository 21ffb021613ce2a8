"""`OperatorStore` on PostgreSQL: the statements of operator.sql, one short connection use each."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import fields
from datetime import datetime
from typing import Any
from uuid import UUID

from imagen.store.operator import STATUSES, JobId, JobRefused
from imagen.store.queries import QUERIES
from imagen.store.rows import (
    Finished,
    FinishedWindow,
    JobSummary,
    ListenerSession,
    MinuteBucket,
    OwnerDay,
    UsageCost,
)

_FINISHED = [f.name for f in fields(Finished)]


def _finished(row: Any) -> dict[str, Any]:
    """finished_window's figures (the columns after minute and start) by Finished's field names."""
    return dict(zip(_FINISHED, row[2:], strict=True))


class PostgresOperatorStore:
    """The operator's reads and writes; a part of `PostgresJobStore`."""

    connect: Callable[[], AbstractContextManager[Any]]

    def _one(self, name: str, params: dict[str, Any] | None = None) -> Any:
        with self.connect() as conn:
            return conn.execute(QUERIES[name], params).fetchone()

    def _all(self, name: str, params: dict[str, Any] | None = None) -> list[Any]:
        with self.connect() as conn:
            return list(conn.execute(QUERIES[name], params).fetchall())

    def _dicts(self, name: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        with self.connect() as conn, conn.cursor(row_factory=dict_row) as cur:
            return list(cur.execute(QUERIES[name], params).fetchall())

    def submit_as_owner(self, owner_user_id: UUID, prompt: str, params: dict[str, Any]) -> UUID:
        import psycopg
        from psycopg.types.json import Jsonb

        claims = json.dumps({"sub": str(owner_user_id), "role": "authenticated"})
        values = {"owner": owner_user_id, "prompt": prompt, "params": Jsonb(params)}
        try:
            with self.connect() as conn, conn.transaction():
                conn.execute(QUERIES["become_owner_role"])
                conn.execute(QUERIES["act_as_owner"], {"claims": claims})
                row = conn.execute(QUERIES["submit_job"], values).fetchone()
        except (psycopg.errors.CheckViolation, psycopg.errors.InsufficientPrivilege) as exc:
            text = exc.diag.message_primary or str(exc).strip().splitlines()[0]
            raise JobRefused(f"the database refused the job: {text}") from None
        return UUID(str(row[0]))

    def list_jobs(
        self,
        *,
        statuses: Sequence[str] = (),
        owner: UUID | None = None,
        since: datetime | None = None,
        text: str | None = None,
        limit: int = 50,
    ) -> list[JobSummary]:
        pattern = "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%" if text else None
        params = {
            "statuses": list(statuses) or None, "owner": owner, "since": since, "pattern": pattern,
            "limit": limit,
        }  # fmt: skip
        return [JobSummary(*row) for row in self._all("list_jobs", params)]

    def status_counts(self) -> list[tuple[str, str | None, int]]:
        return [(status, stage, int(n)) for status, stage, n in self._all("status_counts")]

    def capped_counts(self, cap: int) -> dict[str, int]:
        found = {status: int(n) for status, n in self._all("capped_counts", {"cap": cap})}
        return {status: found.get(status, 0) for status in STATUSES}

    def pending_count(self) -> int:
        row = self._one("pending_count")
        return int(row[0]) if row else 0

    def oldest_pending_seconds(self) -> float | None:
        row = self._one("oldest_pending")
        return row[0] if row else None

    def running_by_stage(self) -> dict[str, int]:
        return {stage: int(n) for stage, n in self._all("running_by_stage")}

    def last_claim(self, window_seconds: float) -> datetime | None:
        row = self._one("last_claim", {"window": window_seconds})
        return row[0] if row else None

    def finished_window(self, window_seconds: float, *, by_minute: bool = False) -> FinishedWindow:
        rows = self._all("finished_window", {"window": window_seconds, "by_minute": by_minute})
        whole, *minutes = rows  # the whole window's row comes first, and is there when nothing finished
        return FinishedWindow(
            whole=Finished(**_finished(whole)),
            start=whole[1],
            minutes=[MinuteBucket(minute=row[0], **_finished(row)) for row in minutes],
        )

    def usage_cost(self, window_seconds: float) -> UsageCost:
        row = self._one("usage_cost", {"window": window_seconds})
        return UsageCost(int(row[0]), float(row[1]), int(row[2]), sorted(row[3]))

    def owners_today(self, limit: int = 50) -> list[OwnerDay]:
        return [
            OwnerDay(
                owner_user_id=row[0],
                images=int(row[1]),
                cost_usd=float(row[2] or 0),
                daily_images=None if row[3] is None else int(row[3]),
                daily_cost_usd=None if row[4] is None else float(row[4]),
                overridden=bool(row[5]),
            )
            for row in self._all("owners_today", {"limit": limit})
        ]

    def job_image(self, job_id: JobId, image_id: JobId | None) -> dict[str, Any] | None:
        found = self._dicts("job_image", {"job_id": job_id, "image_id": image_id})
        return found[0] if found else None

    def job_usage(self, job_id: JobId) -> list[dict[str, Any]]:
        return self._dicts("job_usage", {"job_id": job_id})

    def image_row(self, image_id: JobId) -> dict[str, Any] | None:
        found = self._dicts("image_row", {"image_id": image_id})
        return found[0] if found else None

    def count_prunable(self, statuses: Sequence[str], age_seconds: float) -> int:
        row = self._one("count_prunable", {"statuses": list(statuses), "age": age_seconds})
        return int(row[0]) if row else 0

    def prune_batch(self, statuses: Sequence[str], age_seconds: float, batch: int) -> tuple[int, int]:
        params = {"statuses": list(statuses), "age": age_seconds, "batch": batch}
        with self.connect() as conn, conn.transaction():
            row = conn.execute(QUERIES["prune_batch"], params).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def listener_sessions(self) -> list[ListenerSession]:
        from imagen.store.notify import HEALTH_SQL, LISTEN_SQL

        rows = self._all("listener_sessions", {"listen": LISTEN_SQL, "health": HEALTH_SQL})
        return [ListenerSession(*row) for row in rows]
