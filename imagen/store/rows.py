"""The typed rows the job store hands out and takes in.

`Claim`, `RunningJob` and `Rescued` are the job row as the listener and the
stages see it. `ImageMeta` is what a generation says about its image (it
travels in the hand-off between stages); `ImageRow` is the one description of
an `imagen.images` row, built from it in one place (`ImageRow.of`): its owner
is the locked job's, or the CLI run's for an image without a job. `Discarded`
is what removing an ended job's image took away.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
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
class ImageMeta:
    """A generated image's description: what the images row records besides where it is stored."""

    mime: str
    width: int
    height: int
    backend: str
    model: str
    prompt: str
    params: dict[str, Any]
    preset: str | None = None

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageMeta:
        """The meta `to_json` wrote; keys it does not know are ignored (a hand-off from another version)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ImageRow:
    """One `imagen.images` row: its columns, and nothing else. The owner is not a column here: a job's
    image belongs to the locked job's owner, and a CLI image's owner is passed with it."""

    job_id: UUID | None
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

    @classmethod
    def of(cls, job_id: UUID | None, bucket: str, path: str, size: int, meta: ImageMeta) -> ImageRow:
        """The row of an image stored at `bucket`/`path` (`size` bytes), described by `meta`."""
        return cls(
            job_id=job_id, bucket=bucket, path=path, mime=meta.mime, width=meta.width, height=meta.height,
            bytes=size, prompt=meta.prompt, backend=meta.backend, model=meta.model, params=meta.params,
        )  # fmt: skip

    def values(self) -> dict[str, Any]:
        """The row's columns by name, as the INSERT's parameters."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


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
    "ImageMeta",
    "ImageRow",
    "JobSummary",
    "ListenerSession",
    "MinuteBucket",
    "OwnerDay",
    "Rescued",
    "RunningJob",
    "UsageCost",
]
