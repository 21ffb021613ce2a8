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
from typing import Any
from uuid import UUID

from imagen.jobs import Claim, Rescued, RunningJob


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


__all__ = ["Claim", "Discarded", "ImageMeta", "ImageRow", "Rescued", "RunningJob"]
