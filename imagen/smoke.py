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
from imagen.store.queries import QUERIES

TERMINAL = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class SmokeResult:
    """What the smoke saw. `status` is the job's last status; `timed_out` says the smoke gave up
    waiting (the job was then cancelled: `status` is what it was when the smoke gave up)."""

    job_id: UUID
    status: str
    error: str | None
    pickup_ms: float | None
    total_ms: float | None
    observed_ms: float
    image_id: UUID | None
    timed_out: bool = False
    timeout_s: float = 0.0
    bucket: str | None = None
    path: str | None = None
    file: str | None = None  # local storage: the file, on the worker host

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["job_id"] = str(self.job_id)
        data["image_id"] = str(self.image_id) if self.image_id else None
        return data

    def describe(self) -> str:
        pickup = f"{self.pickup_ms:.1f} ms" if self.pickup_ms is not None else "-"
        total = f"{self.total_ms:.1f} ms" if self.total_ms is not None else "-"
        if self.timed_out:
            status = (
                f"{self.status} after {self.timeout_s:g} s: gave up and cancelled the job ({self.hint()})"
            )
        else:
            status = self.status + (f" ({self.error})" if self.error else "")
        lines = [
            f"job      {self.job_id}",
            f"status   {status}",
            f"pickup   {pickup}  (INSERT -> claimed, server clock)",
            f"total    {total}  (INSERT -> {self.status}, server clock)",
            f"observed {self.observed_ms:.1f} ms  (commit -> seen {self.status} by this client)",
        ]
        if self.image_id:
            lines.append(f"image    {self.image_id} in {self.bucket}/{self.path}")
        if self.file:
            lines.append(f"file     {self.file}  (local storage, on the worker host)")
        return "\n".join(lines)

    def hint(self) -> str:
        """What a job still pending or running after the timeout says about the pipeline."""
        if self.status == "pending":
            return "no listener claimed it: is `imagen listen` running on this database?"
        return "claimed but not finished: are the workers (`dramatiq imagen.actors`) running on the listener's Redis?"


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
    """Insert one job as `authenticated`, wait for it, and measure; cancel it if it does not end in time."""
    owner_id = owner or settings.owner_user_id or uuid.uuid4()
    with connect(settings.require_database_url(), autocommit=True) as conn:
        check_schema(conn)
        job_id = jobs.submit_job(conn, owner_id, prompt, params)
        committed = time.monotonic()
        row = wait_for_terminal(conn, job_id, timeout)
        observed = (time.monotonic() - committed) * 1000
        timed_out = row["status"] not in TERMINAL
        if timed_out:
            # Nothing may pick it up later and spend a provider call on a smoke nobody waits for.
            jobs.cancel_job(conn, job_id)
        image = (
            conn.execute(QUERIES["image_place"], {"image_id": row["image_id"]}).fetchone()
            if row["image_id"]
            else None
        )
    created, claimed, finished = row["created_at"], row["claimed_at"], row["finished_at"]
    bucket, path = image if image else (None, None)
    local = settings.storage_kind == "local" and bucket is not None and path is not None
    return SmokeResult(
        job_id=job_id,
        status=row["status"],
        error=row["error"],
        pickup_ms=(claimed - created).total_seconds() * 1000 if claimed else None,
        total_ms=(finished - created).total_seconds() * 1000 if finished else None,
        observed_ms=observed,
        image_id=row["image_id"],
        timed_out=timed_out,
        timeout_s=timeout,
        bucket=bucket,
        path=path,
        file=str(settings.storage_dir / str(bucket) / str(path)) if local else None,
    )
