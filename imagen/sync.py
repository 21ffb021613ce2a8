"""Cloud sync for CLI runs: upload through the same storage code as the sync stage and record the row.

Returns a `SyncResult` (image id, bucket, path) per image; the pipeline's final
stage links the same kind of result to its job.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from uuid import UUID

from imagen.config import Settings
from imagen.pipeline import Generation
from imagen.storage import cli_object_path, open_storage
from imagen.store.postgres import PostgresJobStore
from imagen.store.rows import ImageMeta, ImageRow


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
    # One connection for the run, opened first: a database that is away fails before any upload.
    with connect(url, autocommit=True) as conn:
        store = PostgresJobStore(lambda: nullcontext(conn))
        for image in generation.images:
            path = cli_object_path(owner_user_id, image.mime)
            stored = storage.put(path, image.data, image.mime)
            meta = ImageMeta(
                mime=image.mime, width=image.width, height=image.height, backend=generation.backend,
                model=generation.model, prompt=generation.prompt, params={**generation.params, "seed": image.seed},
            )  # fmt: skip
            row = ImageRow.of(None, stored.bucket, path, len(image.data), meta)
            image_id = store.insert_image(row, owner_user_id)
            results.append(SyncResult(image_id=image_id, bucket=stored.bucket, path=path))
    return results
