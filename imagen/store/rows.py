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


__all__ = ["Claim", "Discarded", "ImageRow", "Rescued", "RunningJob"]
