"""The chained variant: sync and finalize in the generation message (IMAGEN_CHAIN_STAGES).

No hand-off, two hops and two fenced writes fewer. Safe to crash anywhere for the
same reasons as the separate stages (one object path, one images row, one fenced
statement that writes the row and ends the job). A failed upload must not repeat
the provider call, so a transient error sends the image on to the sync stage's
own message, whose retries own the backoff from there.
"""

from __future__ import annotations

from imagen.logs import transition
from imagen.stages.context import StageContext
from imagen.stages.errors import guarded, usage_first
from imagen.stages.images import record_image
from imagen.stages.lease import heartbeating
from imagen.stages.sync import hand_off
from imagen.storage import job_object_path
from imagen.store.rows import ImageMeta, RunningJob
from imagen.usage import HeldSink


def sync_chained(
    ctx: StageContext,
    job: RunningJob,
    attempt: int,
    data: bytes,
    meta: ImageMeta,
    *,
    held: HeldSink | None = None,
    stage_started: float,
) -> None:
    """Upload, then write the images row and end the job done in one fenced call.

    `stage_started` is when the generation stage began, on `ctx.clock`: the upload gets what is left
    of its time limit.
    """
    job_id = str(job.job_id)
    stage = "syncing"
    started = ctx.clock()
    try:
        with guarded(ctx, job_id, attempt, stage), usage_first(ctx, held):
            path = job_object_path(job.owner_user_id, job.job_id, meta.mime)
            limit = ctx.settings.generate_time_limit - (ctx.clock() - stage_started)
            with heartbeating(ctx, job_id, attempt, limit):
                stored = ctx.storage.put(path, data, meta.mime)
            took = ctx.clock() - started
            image_id = record_image(
                ctx, job, attempt, stored.bucket, path, len(data), meta, complete_after=took, held=held
            )
            if image_id is not None:
                transition("synced", job_id, attempt, stage, image_id=image_id)
                transition("done", job_id, attempt, "finalizing", image_id=image_id)
    except Exception:
        # guarded() noted the error on the row; a failing hand-off retries the generation instead.
        with guarded(ctx, job_id, attempt, "generating"):
            hand_off(ctx, job_id, attempt, data, meta, delay_ms=ctx.settings.retry_min_backoff_ms)
