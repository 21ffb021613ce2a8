"""A job's image row, written in one place from one `ImageRow`, and the discard when its job ended.

The row is written by one fenced store call (`JobStore.record_job_image`): once
per job (a redelivered or rerun stage gets the first row's id), owned by the
locked job's owner, and only while this attempt holds the job. When the fence
fails because the job ended failed or cancelled while we uploaded, the object
we stored goes (`discard_ended`); a newer attempt's job is left alone, it reuses
the same path and row.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from uuid import UUID

from imagen.errors import ImagenError
from imagen.stages.errors import log_drop
from imagen.store.rows import ImageMeta, ImageRow, RunningJob
from imagen.usage import HeldSink

if TYPE_CHECKING:
    from imagen.stages.context import StageContext

log = logging.getLogger("imagen.stages")


def record_image(
    ctx: StageContext,
    job: RunningJob,
    attempt: int,
    bucket: str,
    path: str,
    size: int,
    meta: ImageMeta,
    *,
    complete_after: float | None = None,
    held: HeldSink | None = None,
) -> UUID | None:
    """Write the job's images row under the fence; None (logged as a drop) when the job moved on.

    With `complete_after` (the chained path) the same call ends the job done, and the held
    usage row goes with it.
    """
    job_id = str(job.job_id)
    usage = held.sole() if held is not None else None
    image = ImageRow.of(job.job_id, bucket, path, size, meta)
    image_id = ctx.store.record_job_image(attempt, image, complete_after=complete_after, usage=usage)
    if held is not None and usage is not None:
        held.written()  # fence or not
    if image_id is not None:
        return image_id
    # The job moved on while we uploaded. If it ended failed or cancelled, our object goes,
    # decided under the job's row lock (a retry waits; a newer attempt's job is left alone).
    discard_ended(ctx, job_id)
    log_drop(job_id, attempt, "syncing", ctx.store.job_state(job_id))
    return None


def discard_ended(ctx: StageContext, job_id: str) -> None:
    """A job that ended failed or cancelled keeps no image; whatever this fails to remove, the
    listener's sweep removes later."""
    try:
        ctx.store.discard_ended(job_id, ctx.storage)
    except ImagenError as exc:
        log.warning("could not remove the image of ended job %s: %s; the sweep will", job_id, exc)
