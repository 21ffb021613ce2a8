"""The typed rows the job store hands out and takes in.

`Claim`, `RunningJob` and `Rescued` are the job row as the listener and the
stages see it; `ImageRow` is the one description of an `imagen.images` row a
stage writes (its owner is never in it: the store takes it from the locked
job). `Discarded` is what removing an ended job's image took away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from imagen.image_sweep import Discarded
from imagen.jobs import Claim, Rescued, RunningJob


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


__all__ = ["Claim", "Discarded", "ImageRow", "Rescued", "RunningJob"]
