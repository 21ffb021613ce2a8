"""The in-memory store's state and the stages' part of it: images, usage, the discard of an ended
job's image, quotas, the heartbeat thread's look-up.

`InMemoryStageStore` keeps the same rules as `PostgresStageStore` (tests/store is
the conformance suite both pass); `InMemoryJobStore` adds the claims, the lease
and the operator's writes. One lock stands for PostgreSQL's row locks: every
method is one atomic step, as each of the real store's calls is one committed
statement. Its clock only moves forward, so two calls never share a timestamp.
"""

from __future__ import annotations

import itertools
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

from imagen.errors import ImagenError
from imagen.storage import EXTENSIONS, Storage, job_object_path
from imagen.store.rows import Discarded, ImageRow, RunningJob
from imagen.usage import UsageRecord

if TYPE_CHECKING:
    from imagen.usage_spool import UsageSpool

JobId = UUID | str
ENDED = ("done", "failed", "cancelled")


class InMemoryStageStore:
    """The rows on dicts: `jobs` and `images` by id, `usage` by call id, `quotas` by owner."""

    errors: tuple[type[BaseException], ...] = ()

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

    def _begin(self, job_id: JobId, attempt: int, stage: str) -> dict[str, Any] | None:
        row = self._held(job_id, attempt)
        if row is not None:
            now = self.now()
            self._set(row, stage=stage, heartbeat_at=now, stage_times={**row["stage_times"], stage: now})
        return row

    def begin_sync(self, job_id: JobId, attempt: int) -> tuple[RunningJob | None, UUID | None]:
        with self._lock:
            row = self._begin(job_id, attempt, "syncing")
            if row is None:
                return None, None
            image = self._image_of(row)
            return self._running(row), (image["id"] if image else None)

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
            row = None if image.job_id is None else self._held(image.job_id, attempt)
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

    def insert_image(self, image: ImageRow, owner_user_id: UUID | None) -> UUID:
        with self._lock:
            existing = next(
                (i for i in self.images.values() if image.job_id and i["job_id"] == image.job_id), None
            )
            if existing is not None:
                return UUID(str(existing["id"]))
            row = {**image.values(), "id": uuid4(), "owner_user_id": owner_user_id, "created_at": self.now()}
            self.images[row["id"]] = row
            return UUID(str(row["id"]))

    def replay_usage(self, spool: UsageSpool) -> int:
        written = 0
        for path in spool.pending():
            self.record_usage(UsageRecord.from_json(json.loads(path.read_text())))
            path.unlink(missing_ok=True)
            written += 1
        return written

    def still_running(self, keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
        with self._lock:
            return {(str(job_id), attempt) for job_id, attempt in keys if self._held(job_id, attempt)}

    def owner_quota(self, owner_user_id: UUID) -> tuple[int | None, float | None] | None:
        with self._lock:
            return self.quotas.get(owner_user_id)

    def owner_quotas(self, limit: int) -> dict[UUID, tuple[int | None, float | None]]:
        with self._lock:
            return dict(itertools.islice(self.quotas.items(), limit))

    def used_today(self, owner_user_id: UUID) -> tuple[int, float]:
        with self._lock:
            midnight = self.now().replace(hour=0, minute=0, second=0, microsecond=0)
            today = [
                r
                for r in self.usage.values()
                if r.owner_user_id == owner_user_id and r.created_at >= midnight
            ]
            return sum(r.images for r in today if r.ok), float(sum(r.cost_usd or 0.0 for r in today))

    def recover(self, exc: BaseException) -> None:
        pass

    def close(self) -> None:
        pass
