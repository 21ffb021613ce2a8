"""The job store in memory, keeping PostgresJobStore's rules, for unit tests without a server.

The rows, the clock and the images, usage and quota rules are
`InMemoryStageStore`'s (memory_stages.py); the claims, the lease and the
operator's writes are here. It must never be used to run jobs: nothing here
survives the process.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from imagen.store.base import JobId
from imagen.store.memory_operator import InMemoryOperatorStore
from imagen.store.memory_stages import InMemoryStageStore
from imagen.store.rows import Claim, Rescued, RunningJob


class InMemoryJobStore(InMemoryStageStore, InMemoryOperatorStore):
    """`JobStore` on dicts: claims, the lease and the operator's writes over `InMemoryStageStore`'s rows.

    The operator's reads are `InMemoryOperatorStore`'s (memory_operator.py).
    """

    def submit_job(self, owner_user_id: UUID, prompt: str, params: Any) -> UUID:
        with self._lock:
            job_id, now, owner = uuid4(), self.now(), UUID(str(owner_user_id))
            mine = [r["fair_round"] for r in self._pending() if r["owner_user_id"] == owner]
            fair_round = max(self._current_round(), max(mine, default=-1) + 1)  # sql/012_fair_rounds.sql
            self.jobs[job_id] = {
                "id": job_id, "owner_user_id": owner, "prompt": prompt, "params": params,
                "status": "pending", "stage": None, "attempt": 0, "error": None, "last_error": None,
                "image_id": None, "created_at": now, "updated_at": now, "claimed_at": None,
                "heartbeat_at": None, "finished_at": None, "stage_times": {}, "image_swept_at": None, "pending_at": None,
                "fair_round": fair_round,
            }  # fmt: skip
            return job_id

    def _pending(self) -> list[dict[str, Any]]:
        return [r for r in self.jobs.values() if r["status"] == "pending"]

    def _current_round(self) -> int:
        """The lowest round still pending (0 when none is): where a job put back to pending goes."""
        return min((r["fair_round"] for r in self._pending()), default=0)

    def _requeue(self, row: dict[str, Any], **values: Any) -> None:
        """Back to pending in its own round, or the current one if later (sql/012_fair_rounds.sql)."""
        fair_round = min(self._current_round(), row["fair_round"])
        self._set(row, status="pending", fair_round=fair_round, **values)

    def claim_jobs(self, limit: int, *, max_owners: int = 1000) -> list[Claim]:
        with self._lock:
            ordered = sorted(self._pending(), key=lambda r: (r["fair_round"], *_age(r)))[:limit]
            owners: list[UUID] = []
            for row in ordered:
                if row["owner_user_id"] not in owners:
                    owners.append(row["owner_user_id"])
            taken = set(owners[:max_owners])
            claims = []
            for row in (r for r in ordered if r["owner_user_id"] in taken):
                now = self.now()
                self._set(
                    row, status="running", stage="queued", attempt=row["attempt"] + 1, claimed_at=now,
                    heartbeat_at=now, error=None, last_error=None, stage_times={"queued": now},
                )  # fmt: skip
                claims.append(_claim(row, now))
            return claims

    def count_running(self) -> int:
        with self._lock:
            return sum(1 for r in self.jobs.values() if r["status"] == "running")

    def claim_within_cap(self, limit: int, max_in_flight: int) -> tuple[list[Claim], int | None]:
        with self._lock:
            running = self.count_running()
            claims = self.claim_jobs(max(0, min(limit, max_in_flight - running)))
            return claims, (running if claims else None)

    def release_claim(self, job_id: JobId, attempt: int) -> bool:
        with self._lock:
            row = self._held(job_id, attempt)
            if row is None:
                return False
            self._requeue(row, stage=None, attempt=attempt - 1, claimed_at=None, heartbeat_at=None)
            return True

    def rescue_expired(self, *, lease_seconds: float, max_attempts: int, limit: int = 1000) -> list[Rescued]:
        with self._lock:
            cutoff = self.now() - timedelta(seconds=lease_seconds)
            expired = sorted(
                (r for r in self.jobs.values() if r["status"] == "running" and r["heartbeat_at"] < cutoff),
                key=lambda r: r["heartbeat_at"],
            )[:limit]
            rescued = []
            for row in expired:
                if row["attempt"] >= max_attempts and row["stage"] != "queued":
                    last = f"; last error: {row['last_error']}" if row["last_error"] is not None else ""
                    error = (
                        f"gave up after {row['attempt']} attempts: the job stopped making progress in "
                        f"stage {row['stage'] or 'queued'} (no heartbeat for {_number(lease_seconds)} s){last}"
                    )
                    self._set(row, status="failed", error=error, stage=None, heartbeat_at=None)
                else:
                    self._requeue(row, stage=None, heartbeat_at=None, pending_at=self.now())
                rescued.append(Rescued(row["id"], row["status"], row["attempt"]))
            return rescued

    def begin_stage(self, job_id: JobId, attempt: int, stage: str) -> RunningJob | None:
        with self._lock:
            row = self._begin(job_id, attempt, stage)
            return None if row is None else self._running(row)

    def heartbeat_many(self, keys: list[tuple[str, int]]) -> int:
        with self._lock:
            held = [row for row in (self._held(job_id, attempt) for job_id, attempt in keys) if row]
            for row in held:
                self._set(row, heartbeat_at=self.now())
            return len(held)

    def note_transient(self, job_id: JobId, attempt: int, error: str) -> bool:
        with self._lock:
            row = self._held(job_id, attempt)
            if row is not None:
                self._set(row, last_error=error[:2000], heartbeat_at=self.now())
            return row is not None

    def fail_job(self, job_id: JobId, attempt: int, error: str) -> bool:
        with self._lock:
            row = self._held(job_id, attempt)
            if row is not None:
                self._set(row, status="failed", error=error[:4000], stage=None)
            return row is not None

    def complete_job(self, job_id: JobId, attempt: int, image_id: JobId) -> bool:
        with self._lock:
            row = self._held(job_id, attempt)
            if row is not None:
                self._set(
                    row, status="done", image_id=UUID(str(image_id)), stage=None, error=None,
                    last_error=None, stage_times={**row["stage_times"], "done": self.now()},
                )  # fmt: skip
            return row is not None

    def job_state(self, job_id: JobId) -> tuple[str, int] | None:
        with self._lock:
            row = self.jobs.get(UUID(str(job_id)))
            return None if row is None else (row["status"], row["attempt"])

    def get_job(self, job_id: JobId) -> dict[str, Any] | None:
        with self._lock:
            row = self.jobs.get(UUID(str(job_id)))
            return None if row is None else dict(row)

    def cancel_job(self, job_id: JobId) -> bool:
        with self._lock:
            row = self.jobs.get(UUID(str(job_id)))
            if row is None or row["status"] not in ("pending", "running"):
                return False
            self._set(row, status="cancelled")
            return True

    def retry_job(self, job_id: JobId) -> bool:
        with self._lock:
            row = self.jobs.get(UUID(str(job_id)))
            if row is None or row["status"] not in ("failed", "cancelled"):
                return False
            self._requeue(
                row, stage=None, error=None, last_error=None, image_id=None,
                claimed_at=None, heartbeat_at=None, stage_times={}, pending_at=self.now(),
            )  # fmt: skip
            row["finished_at"] = None
            return True


def _claim(row: dict[str, Any], claimed_at: datetime) -> Claim:
    values = {
        "job_id": row["id"], "attempt": row["attempt"], "owner_user_id": row["owner_user_id"],
        "created_at": row["created_at"], "claimed_at": claimed_at,
    }  # fmt: skip
    if "pending_since" in Claim.__dataclass_fields__:  # issue 16's field, when its Claim has it
        values["pending_since"] = row.get("pending_at") or row["created_at"]
    return Claim(**values)


def _age(row: dict[str, Any]) -> tuple[datetime, str]:
    return row["created_at"], str(row["id"])


def _number(value: float) -> str:
    """A float as PostgreSQL's format() prints it: 600, not 600.0."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
