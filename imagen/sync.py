"""Cloud sync for CLI runs: upload through the same storage code as the sync stage and record the row.

Returns a `SyncResult` (image id, bucket, path) per image; the pipeline's final
stage links the same kind of result to its job.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from imagen import job_images
from imagen.config import Settings
from imagen.pipeline import Generation
from imagen.storage import cli_object_path, open_storage


@dataclass(frozen=True)
class SyncResult:
    image_id: UUID
    bucket: str
    path: str


def sync_generation(
    settings: Settings, generation: Generation, owner_user_id: UUID | None
) -> list[SyncResult]:
    """Upload every image of a CLI generation and insert its imagen.images row (job_id NULL)."""
    from imagen.db import connect

    url = settings.require_database_url()
    storage = open_storage(settings)
    results = []
    with connect(url, autocommit=True) as conn:
        for image in generation.images:
            path = cli_object_path(owner_user_id, image.mime)
            stored = storage.put(path, image.data, image.mime)
            image_id = job_images.insert_image(
                conn,
                {
                    "owner_user_id": owner_user_id, "job_id": None, "bucket": stored.bucket, "path": path,
                    "mime": image.mime, "width": image.width, "height": image.height, "bytes": len(image.data),
                    "prompt": generation.prompt, "backend": generation.backend, "model": generation.model,
                    "params": {**generation.params, "seed": image.seed},
                },
            )  # fmt: skip
            results.append(SyncResult(image_id=image_id, bucket=stored.bucket, path=path))
    return results
