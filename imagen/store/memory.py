"""The job store in memory, keeping PostgresJobStore's rules, for unit tests without a server.

One lock stands for PostgreSQL's row locks: every method is one atomic step, as
each of the real store's calls is one committed statement. Its clock only moves
forward, so two calls never share a timestamp. It must never be used to run
jobs: nothing here survives the process.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from imagen.errors import ImagenError
from imagen.storage import EXTENSIONS, Storage, job_object_path
from imagen.store.base import JobId
from imagen.store.memory_operator import InMemoryOperatorStore
from imagen.store.rows import Claim, Discarded, ImageRow, Rescued, RunningJob
from imagen.usage import UsageRecord

ENDED = ("done", "failed", "cancelled")


class InMemoryJobStore(InMemoryOperatorStore):
    """`JobStore` on dicts: `jobs` and `images` by id, `usage` by call id, `quotas` by owner.

    The operator's reads are `InMemoryOperatorStore`'s (memory_operator.py).
    """

    def __init__(self) -> None:
        self.jobs: dict[UUID, dict[str, Any]] = {}
        self.images: dict[UUID, dict[str, Any]] = {}
        self.usage: dict[UUID, UsageRecord] = {}
        self._lock = threading.RLock()
        self._last = datetime.now(UTC)

        self.quotas: dict[UUID, tuple[int | None, float | None]] = {}

    def now(self) -> datetime:
        """The store's clock: wall time, but strictly later than any time it gave before."""
        with self._lock:
            self._last = max(datetime.now(UTC), self._last + timedelta(microseconds=1))
            return self._last

    def _set(self, row: dict[str, Any], **values: Any) -> None:
        """Update a row as the jobs_before_update trigger does (sql/002_jobs.sql): a cancel clears the stage."""
        row.update(values)
        row["updated_at"] = self.now()
        if values.get("status") in ENDED:
            row["finished_at"] = row["updated_at"]
        if values.get("status") == "cancelled":
            row["stage"] = None

    def _held(self, job_id: JobId, attempt: int) -> dict[str, Any] | None:
        """The job's row if `attempt` still holds it (the fence every stage write takes)."""
        row = self.jobs.get(UUID(str(job_id)))
        if row is None or row["status"] != "running" or row["attempt"] != attempt:
            return None
        return row

    @staticmethod
    def _running(row: dict[str, Any]) -> RunningJob:
        return RunningJob(
            job_id=row["id"], owner_user_id=row["owner_user_id"], prompt=row["prompt"],
            params_json=json.dumps(row["params"]), attempt=row["attempt"], created_at=row["created_at"],
            claimed_at=row["claimed_at"],
        )  # fmt: skip

    def submit_job(self, owner_user_id: UUID, prompt: str, params: Any) -> UUID:
        with self._lock:
            job_id, now, owner = uuid4(), self.now(), UUID(str(owner_user_id))
            mine = [r.get("fair_round", 0) for r in self._pending() if r["owner_user_id"] == owner]
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
        return min((r.get("fair_round", 0) for r in self._pending()), default=0)

    def _requeue(self, row: dict[str, Any], **values: Any) -> None:
        """Back to pending in its own round, or the current one if later (sql/012_fair_rounds.sql)."""
        fair_round = min(self._current_round(), row.get("fair_round", 1 << 62))
        self._set(row, status="pending", fair_round=fair_round, **values)

    def claim_jobs(self, limit: int, *, max_owners: int = 1000) -> list[Claim]:
        with self._lock:
            ordered = sorted(self._pending(), key=lambda r: (r.get("fair_round", 0), *_age(r)))[:limit]
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

    def _begin(self, job_id: JobId, attempt: int, stage: str) -> dict[str, Any] | None:
        row = self._held(job_id, attempt)
        if row is not None:
            now = self.now()
            self._set(row, stage=stage, heartbeat_at=now, stage_times={**row["stage_times"], stage: now})
        return row

    def begin_stage(self, job_id: JobId, attempt: int, stage: str) -> RunningJob | None:
        with self._lock:
            row = self._begin(job_id, attempt, stage)
            return None if row is None else self._running(row)

    def begin_sync(self, job_id: JobId, attempt: int) -> tuple[RunningJob | None, UUID | None]:
        with self._lock:
            row = self._begin(job_id, attempt, "syncing")
            if row is None:
                return None, None
            image = self._image_of(row)
            return self._running(row), (image["id"] if image else None)

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

    def _image_of(self, job: dict[str, Any]) -> dict[str, Any] | None:
        return next(
            (
                i
                for i in self.images.values()
                if i["job_id"] == job["id"] and i["owner_user_id"] == job["owner_user_id"]
            ),
            None,
        )

    def _upsert_image(self, job: dict[str, Any], image: ImageRow) -> UUID | None:
        """The job's images row: the one already there, or this one (owned by the job's owner)."""
        existing = next((i for i in self.images.values() if i["job_id"] == job["id"]), None)
        if existing is not None:
            return existing["id"] if existing["owner_user_id"] == job["owner_user_id"] else None
        row = {
            **image.values(),
            "id": uuid4(),
            "owner_user_id": job["owner_user_id"],
            "created_at": self.now(),
        }
        self.images[row["id"]] = row
        return UUID(str(row["id"]))

    def record_job_image(
        self,
        attempt: int,
        image: ImageRow,
        *,
        complete_after: float | None = None,
        usage: UsageRecord | None = None,
    ) -> UUID | None:
        with self._lock:
            if complete_after is not None and usage is not None:
                self.usage.setdefault(usage.call_id, usage)
            row = self._held(image.job_id, attempt)
            if row is None:
                return None
            if complete_after is None:
                now = self.now()
                self._set(
                    row,
                    stage="finalizing",
                    heartbeat_at=now,
                    stage_times={**row["stage_times"], "finalizing": now},
                )
                return self._upsert_image(row, image)
            image_id = self._upsert_image(row, image)
            if image_id is None:
                return None
            now = self.now()
            times = {
                **row["stage_times"],
                "syncing": now - timedelta(seconds=max(0.0, complete_after)),
                "done": now,
            }
            self._set(
                row,
                status="done",
                image_id=image_id,
                stage=None,
                error=None,
                last_error=None,
                stage_times=times,
            )
            return image_id

    def record_usage(self, record: UsageRecord) -> None:
        with self._lock:
            self.usage.setdefault(record.call_id, record)

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

    def discard_ended(self, job_id: JobId, storage: Storage) -> Discarded | None:
        with self._lock:
            row = self.jobs.get(UUID(str(job_id)))
            if row is None or row["status"] not in ("failed", "cancelled"):
                return None
            owner = row["owner_user_id"]
            deleted = [
                i for i in self.images.values() if i["job_id"] == row["id"] and i["owner_user_id"] == owner
            ]
            paths = {i["path"] for i in deleted} | {job_object_path(owner, row["id"], m) for m in EXTENSIONS}
            for image in deleted:
                del self.images[image["id"]]
            paths -= {i["path"] for i in self.images.values() if i["bucket"] == storage.bucket}
            # As in PostgreSQL, a storage error leaves the row where it was (the transaction rolls back).
            try:
                objects = [path for path in sorted(paths) if storage.delete(path)]
            except BaseException:
                self.images.update({i["id"]: i for i in deleted})
                raise
            self._set(row, image_swept_at=self.now())  # an UPDATE: updated_at moves too
            return Discarded(row["id"], row["status"], row["attempt"], bool(deleted), objects)

    def sweep_ended(self, storage: Storage, *, limit: int = 100) -> list[Discarded]:
        with self._lock:
            unswept = sorted(
                (
                    r
                    for r in self.jobs.values()
                    if r["status"] in ("failed", "cancelled")
                    and (r["image_swept_at"] is None or r["image_swept_at"] < r["finished_at"])
                ),
                key=lambda r: r["finished_at"],
            )[:limit]
        found = []
        for row in unswept:
            try:
                done = self.discard_ended(row["id"], storage)
            except ImagenError:
                continue  # stays unswept: the next sweep tries again
            if done is not None and done.removed_anything:
                found.append(done)
        return found


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
