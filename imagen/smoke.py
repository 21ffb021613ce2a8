"""The SQL INSERT smoke: one job inserted as the UI inserts it, followed to its end."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any
from uuid import UUID

from imagen import jobs
from imagen.config import Settings
from imagen.db import check_schema, connect

TERMINAL = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class SmokeResult:
    job_id: UUID
    status: str
    error: str | None
    pickup_ms: float | None
    total_ms: float | None
    observed_ms: float
    image_id: UUID | None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["job_id"] = str(self.job_id)
        data["image_id"] = str(self.image_id) if self.image_id else None
        return data

    def describe(self) -> str:
        pickup = f"{self.pickup_ms:.1f} ms" if self.pickup_ms is not None else "-"
        total = f"{self.total_ms:.1f} ms" if self.total_ms is not None else "-"
        lines = [
            f"job      {self.job_id}",
            f"status   {self.status}" + (f" ({self.error})" if self.error else ""),
            f"pickup   {pickup}  (INSERT -> claimed, server clock)",
            f"total    {total}  (INSERT -> {self.status}, server clock)",
            f"observed {self.observed_ms:.1f} ms  (commit -> seen terminal by this client)",
        ]
        if self.image_id:
            lines.append(f"image    {self.image_id}")
        return "\n".join(lines)


def wait_for_terminal(
    conn: jobs.Conn, job_id: UUID, timeout: float, interval: float = 0.005
) -> dict[str, Any]:
    """Poll the row until it is terminal or the deadline passes; return the row."""
    deadline = time.monotonic() + timeout
    while True:
        row = jobs.get_job(conn, job_id)
        if row is None:
            raise LookupError(f"job {job_id} disappeared")
        if row["status"] in TERMINAL or time.monotonic() > deadline:
            return row
        time.sleep(interval)


def run_smoke(
    settings: Settings, *, prompt: str, params: Any, owner: UUID | None = None, timeout: float = 60.0
) -> SmokeResult:
    """Insert one job as `authenticated`, wait for it, and measure."""
    owner_id = owner or settings.owner_user_id or uuid.uuid4()
    with connect(settings.require_database_url(), autocommit=True) as conn:
        check_schema(conn)
        job_id = jobs.submit_job(conn, owner_id, prompt, params)
        committed = time.monotonic()
        row = wait_for_terminal(conn, job_id, timeout)
        observed = (time.monotonic() - committed) * 1000
    created, claimed, finished = row["created_at"], row["claimed_at"], row["finished_at"]
    return SmokeResult(
        job_id=job_id,
        status=row["status"]
        if row["status"] in TERMINAL
        else f"{row['status']} (timed out after {timeout:.0f}s)",
        error=row["error"],
        pickup_ms=(claimed - created).total_seconds() * 1000 if claimed else None,
        total_ms=(finished - created).total_seconds() * 1000 if finished else None,
        observed_ms=observed,
        image_id=row["image_id"],
    )
