"""The typed rows the job store hands out and takes in.

`Claim`, `RunningJob` and `Rescued` are the job row as the listener and the
stages see it; `ImageRow` is the one description of an `imagen.images` row a
stage writes (its owner is never in it: the store takes it from the locked
job). `Discarded` is what removing an ended job's image took away.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class Claim:
    """A job the listener took: what goes into the generation message."""

    job_id: UUID
    attempt: int
    owner_user_id: UUID
    created_at: datetime
    claimed_at: datetime
    pending_since: datetime  # created_at, or when a retry or rescue last made it pending again

    @property
    def pickup_seconds(self) -> float:
        """Pending -> claimed on the server's clock: the wait of this claim, not of earlier attempts."""
        return (self.claimed_at - self.pending_since).total_seconds()


@dataclass(frozen=True)
class RunningJob:
    """A job as a stage sees it once its fence held."""

    job_id: UUID
    owner_user_id: UUID
    prompt: str
    # As text: jsonb holds what Python's json cannot load; `load_params` turns that into InvalidRequest.
    params_json: str
    attempt: int
    created_at: datetime
    claimed_at: datetime | None


@dataclass(frozen=True)
class Rescued:
    """A running job whose lease expired, and where the rescue put it (pending or failed)."""

    job_id: UUID
    status: str
    attempt: int


@dataclass(frozen=True)
class ImageRow:
    """A job's image as its `imagen.images` row records it (the owner is the job's)."""

    job_id: UUID
    bucket: str
    path: str
    mime: str
    width: int
    height: int
    bytes: int
    prompt: str
    backend: str
    model: str
    params: dict[str, Any]

    def values(self) -> dict[str, Any]:
        """The row's columns by name, as the INSERT's parameters."""
        return {
            "job_id": self.job_id, "bucket": self.bucket, "path": self.path, "mime": self.mime,
            "width": self.width, "height": self.height, "bytes": self.bytes, "prompt": self.prompt,
            "backend": self.backend, "model": self.model, "params": self.params,
        }  # fmt: skip


@dataclass(frozen=True)
class Discarded:
    """What `discard_ended` removed for one job."""

    job_id: UUID
    status: str
    attempt: int
    row: bool
    objects: list[str]

    @property
    def removed_anything(self) -> bool:
        return self.row or bool(self.objects)


# ---- section: operator - what `imagen jobs ...` and `imagen web` read ----


@dataclass(frozen=True)
class JobSummary:
    """One line of `imagen jobs ls` and of the dashboard's list."""

    id: UUID
    owner_user_id: UUID
    status: str
    stage: str | None
    attempt: int
    prompt: str
    error: str | None
    image_id: UUID | None
    created_at: datetime
    claimed_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Finished:
    """Jobs that finished in a span of time, and the latencies of the done ones (seconds)."""

    done: int
    failed: int
    cancelled: int
    pickup_p50: float | None
    pickup_p95: float | None
    total_p50: float | None
    total_p95: float | None


@dataclass(frozen=True)
class MinuteBucket(Finished):
    """Jobs that finished in one minute (a point of the health charts)."""

    minute: datetime = datetime.min


@dataclass(frozen=True)
class FinishedWindow:
    """Jobs that finished in a window: the whole of it, and per minute from `start` when asked."""

    whole: Finished
    start: datetime
    minutes: list[MinuteBucket]


@dataclass(frozen=True)
class UsageCost:
    """Provider spend over a window; unpriced calls are counted and named, never left out silently."""

    calls: int
    cost_usd: float
    unpriced_calls: int
    unpriced_models: list[str]


@dataclass(frozen=True)
class OwnerDay:
    """An owner's usage since midnight UTC and its quota override row (None where it sets no limit)."""

    owner_user_id: UUID
    images: int
    cost_usd: float
    daily_images: int | None
    daily_cost_usd: float | None
    overridden: bool


@dataclass(frozen=True)
class ListenerSession:
    """One `imagen listen` session seen in pg_stat_activity."""

    pid: int
    client: str | None
    connected_at: datetime
    state_since: datetime | None


__all__ = [
    "Claim",
    "Discarded",
    "Finished",
    "FinishedWindow",
    "ImageRow",
    "JobSummary",
    "ListenerSession",
    "MinuteBucket",
    "OwnerDay",
    "Rescued",
    "RunningJob",
    "UsageCost",
]
