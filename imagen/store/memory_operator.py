"""`OperatorStore` in memory: operator.sql's statements over `InMemoryJobStore`'s dicts.

What a server would compute (percentile_cont, per-minute buckets, the owner
quota join, prune's detach by foreign key) is done here the same way, so the
rules above the store get unit tests without one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from imagen.store.operator import STATUSES, TERMINAL, JobId, JobRefused
from imagen.store.rows import (
    Finished,
    FinishedWindow,
    JobSummary,
    ListenerSession,
    MinuteBucket,
    OwnerDay,
    UsageCost,
)
from imagen.usage import UsageRecord

_SUMMARY = [f.name for f in dataclasses.fields(JobSummary)]
_IMAGE = ("id", "bucket", "path", "mime", "width", "height", "bytes", "backend", "model", "created_at")
_IMAGE_ROW = ("id", "job_id", "owner_user_id", "bucket", "path", "mime", "width", "height", "bytes")
_USAGE = (
    "backend", "model", "images", "input_tokens", "output_tokens", "cost_usd", "cost_basis", "latency_ms",
    "ok", "error", "created_at",
)  # fmt: skip
_MINUTE = timedelta(minutes=1)


class InMemoryOperatorStore:
    """The operator's reads and writes; a part of `InMemoryJobStore` (whose dicts it reads)."""

    jobs: dict[UUID, dict[str, Any]]
    images: dict[UUID, dict[str, Any]]
    usage: dict[UUID, UsageRecord]
    quotas: dict[UUID, tuple[int | None, float | None]]
    _lock: threading.RLock
    now: Callable[[], datetime]
    submit_job: Callable[[UUID, str, Any], UUID]

    def submit_as_owner(self, owner_user_id: UUID, prompt: str, params: dict[str, Any]) -> UUID:
        # The CHECK constraints of sql/002_jobs.sql and sql/014_params_size.sql, worded as PostgreSQL words them.
        if not prompt.strip(" \t\n\r\f\v") or len(prompt) > 4000:
            refused = "jobs_prompt_check"
        elif not isinstance(params, dict):
            refused = "jobs_params_check"
        elif len(json.dumps(params, ensure_ascii=False).encode()) > 16384:  # sql/014_params_size.sql
            refused = "jobs_params_size_check"
        else:
            return self.submit_job(owner_user_id, prompt, params)
        raise JobRefused(
            f'the database refused the job: new row for relation "jobs" violates check constraint "{refused}"'
        )

    def list_jobs(
        self,
        *,
        statuses: Sequence[str] = (),
        owner: UUID | None = None,
        since: datetime | None = None,
        text: str | None = None,
        limit: int = 50,
    ) -> list[JobSummary]:
        with self._lock:
            found = [
                r
                for r in self.jobs.values()
                if (not statuses or r["status"] in statuses)
                and (owner is None or r["owner_user_id"] == owner)
                and (since is None or r["created_at"] >= since)
                and (not text or text.lower() in r["prompt"].lower())
            ]
            found.sort(key=lambda r: (r["created_at"], str(r["id"])), reverse=True)
            return [JobSummary(*(r[name] for name in _SUMMARY)) for r in found[:limit]]

    def status_counts(self) -> list[tuple[str, str | None, int]]:
        with self._lock:
            pairs: dict[tuple[str, str | None], int] = {}
            for r in self.jobs.values():
                pairs[r["status"], r["stage"]] = pairs.get((r["status"], r["stage"]), 0) + 1
            return [(status, stage, n) for (status, stage), n in pairs.items()]

    def capped_counts(self, cap: int) -> dict[str, int]:
        with self._lock:
            return {s: min(cap, sum(1 for r in self.jobs.values() if r["status"] == s)) for s in STATUSES}

    def pending_count(self) -> int:
        with self._lock:
            return sum(1 for r in self.jobs.values() if r["status"] == "pending")

    def oldest_pending_seconds(self) -> float | None:
        with self._lock:
            pending = [r["created_at"] for r in self.jobs.values() if r["status"] == "pending"]
            return (self.now() - min(pending)).total_seconds() if pending else None

    def running_by_stage(self) -> dict[str, int]:
        with self._lock:
            found: dict[str, int] = {}
            for r in self.jobs.values():
                if r["status"] == "running":
                    found[r["stage"] or "none"] = found.get(r["stage"] or "none", 0) + 1
            return found

    def last_claim(self, window_seconds: float) -> datetime | None:
        with self._lock:
            since = self.now() - timedelta(seconds=window_seconds)
            claims = [
                r["claimed_at"]
                for r in self.jobs.values()
                if r["claimed_at"] is not None
                and (r["status"] == "running" or (r["finished_at"] is not None and r["finished_at"] >= since))
            ]
            return max(claims, default=None)

    def finished_window(self, window_seconds: float, *, by_minute: bool = False) -> FinishedWindow:
        with self._lock:
            now = self.now()
            since = now - timedelta(seconds=window_seconds)
            start = now.replace(second=0, microsecond=0) - timedelta(seconds=window_seconds) + _MINUTE
            rows = [
                r for r in self.jobs.values() if r["finished_at"] is not None and r["finished_at"] >= since
            ]
        minutes: dict[datetime, list[dict[str, Any]]] = {}
        for r in rows:
            minute = start + _MINUTE * math.floor((r["finished_at"] - start) / _MINUTE)
            if minute >= start:
                minutes.setdefault(minute, []).append(r)
        return FinishedWindow(
            whole=_finished(rows, Finished),
            start=start,
            minutes=[_finished(minutes[m], MinuteBucket, minute=m) for m in sorted(minutes)]
            if by_minute
            else [],
        )

    def usage_cost(self, window_seconds: float) -> UsageCost:
        with self._lock:
            since = self.now() - timedelta(seconds=window_seconds)
            calls = [u for u in self.usage.values() if u.created_at >= since]
        unpriced = [u for u in calls if u.cost_usd is None]
        return UsageCost(
            calls=len(calls),
            cost_usd=float(sum(u.cost_usd or 0 for u in calls)),
            unpriced_calls=len(unpriced),
            unpriced_models=sorted({f"{u.backend}/{u.model}" for u in unpriced}),
        )

    def owners_today(self, limit: int = 50) -> list[OwnerDay]:
        with self._lock:
            midnight = self.now().astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            used: dict[UUID, list[UsageRecord]] = {}
            for u in self.usage.values():
                if u.owner_user_id is not None and u.created_at >= midnight:
                    used.setdefault(u.owner_user_id, []).append(u)
            quotas = dict(self.quotas)
        found = []
        for owner in used.keys() | quotas.keys():
            calls = used.get(owner, [])
            images = sum(u.images for u in calls if u.ok)
            cost = float(sum(u.cost_usd or 0 for u in calls))
            daily_images, daily_cost = quotas.get(owner, (None, None))
            found.append(OwnerDay(owner, images, cost, daily_images, daily_cost, owner in quotas))
        found.sort(key=lambda o: (-o.cost_usd, -o.images, str(o.owner_user_id)))
        return found[:limit]

    def job_image(self, job_id: JobId, image_id: JobId | None) -> dict[str, Any] | None:
        with self._lock:
            linked = self.images.get(UUID(str(image_id))) if image_id is not None else None
            written = next((i for i in self.images.values() if i["job_id"] == UUID(str(job_id))), None)
            found = linked or written
            return {k: found[k] for k in _IMAGE} if found else None

    def job_usage(self, job_id: JobId) -> list[dict[str, Any]]:
        with self._lock:
            mine = [u for u in self.usage.values() if u.job_id == UUID(str(job_id))]
        mine.sort(key=lambda u: u.created_at)
        return [{k: getattr(u, k) for k in _USAGE} for u in mine]

    def image_row(self, image_id: JobId) -> dict[str, Any] | None:
        with self._lock:
            found = self.images.get(UUID(str(image_id)))
            return {k: found[k] for k in _IMAGE_ROW} if found else None

    def _prunable(self, statuses: Sequence[str], age_seconds: float) -> Iterable[dict[str, Any]]:
        cutoff = self.now() - timedelta(seconds=age_seconds)
        for r in self.jobs.values():
            if (
                r["status"] in statuses
                and r["status"] in TERMINAL
                and (r["finished_at"] or r["created_at"]) < cutoff
            ):
                yield r

    def count_prunable(self, statuses: Sequence[str], age_seconds: float) -> int:
        with self._lock:
            return sum(1 for _ in self._prunable(statuses, age_seconds))

    def prune_batch(self, statuses: Sequence[str], age_seconds: float, batch: int) -> tuple[int, int]:
        with self._lock:
            gone = {r["id"] for r in self._prunable(statuses, age_seconds)}
            gone = set(sorted(gone, key=str)[:batch])
            detached = 0
            for image in self.images.values():
                if image["job_id"] in gone:
                    image["job_id"] = None  # the foreign key's ON DELETE SET NULL
                    detached += 1
            for job_id in gone:
                del self.jobs[job_id]
            return len(gone), detached

    def listener_sessions(self) -> list[ListenerSession]:
        return []  # no server, no sessions: a listener holds a PostgreSQL connection


def _finished(rows: list[dict[str, Any]], kind: Any, **extra: Any) -> Any:
    done = [r for r in rows if r["status"] == "done"]
    pickup = sorted(
        (r["claimed_at"] - (r["pending_at"] or r["created_at"])).total_seconds()
        for r in done
        if r["claimed_at"] is not None
    )
    total = sorted((r["finished_at"] - r["created_at"]).total_seconds() for r in done)
    return kind(
        done=len(done),
        failed=sum(1 for r in rows if r["status"] == "failed"),
        cancelled=sum(1 for r in rows if r["status"] == "cancelled"),
        pickup_p50=percentile_cont(pickup, 0.5),
        pickup_p95=percentile_cont(pickup, 0.95),
        total_p50=percentile_cont(total, 0.5),
        total_p95=percentile_cont(total, 0.95),
        **extra,
    )


def percentile_cont(ordered: Sequence[float], fraction: float) -> float | None:
    """PostgreSQL's percentile_cont over sorted values: linear between the two nearest; None for none."""
    if not ordered:
        return None
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
