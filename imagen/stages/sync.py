"""The sync stage: take the hand-off, upload at the job's one path (upsert), write the images row once.

Idempotent however often it runs: one deterministic object path, one images row
per job. A redelivered message after the row was written goes straight on to
finalize; a hand-off that expired or was lost regenerates the image at the same
attempt (the provider is called again, the job is not failed).
"""

from __future__ import annotations

from imagen.broker import (
    FINALIZE_ACTOR,
    FINALIZE_QUEUE,
    GENERATE_ACTOR,
    GENERATE_QUEUE,
    SYNC_ACTOR,
    SYNC_QUEUE,
)
from imagen.logs import transition
from imagen.stages.context import StageContext
from imagen.stages.errors import drop, guarded
from imagen.stages.images import record_image
from imagen.storage import job_object_path
from imagen.store.rows import ImageMeta


def hand_off(
    ctx: StageContext, job_id: str, attempt: int, data: bytes, meta: ImageMeta, *, delay_ms: int = 0
) -> None:
    """The image to the sync stage: its bytes in the hand-off, then the sync message."""
    ctx.handoff.put(job_id, attempt, data, meta)
    ctx.send(SYNC_ACTOR, SYNC_QUEUE, job_id, attempt, delay_ms=delay_ms)


def run_sync(ctx: StageContext, job_id: str, attempt: int) -> None:
    """Cloud-sync stage: upload at the job's one path (upsert), write the images row once."""
    stage = "syncing"
    job, existing = ctx.store.begin_sync(job_id, attempt)
    if job is None:
        # This attempt is over (cancelled, rescued or ended): its hand-off can never be used.
        ctx.handoff.drop(job_id, attempt)
        drop(ctx, job_id, attempt, stage)
        return
    with guarded(ctx, job_id, attempt, stage):
        if existing is not None:
            # A redelivered sync message after the row was written: go straight on.
            ctx.send(FINALIZE_ACTOR, FINALIZE_QUEUE, job_id, attempt, str(existing))
            ctx.handoff.drop(job_id, attempt)
            return
        handed = ctx.handoff.get(job_id, attempt)
        if handed is None:
            transition("regenerating", job_id, attempt, stage, reason="hand-off expired or lost")
            ctx.send(GENERATE_ACTOR, GENERATE_QUEUE, job_id, attempt)
            return
        meta = handed.meta
        ctx.note_pixels(meta.pixels)
        path = job_object_path(job.owner_user_id, job.job_id, meta.mime)
        stored = ctx.storage.put(path, handed.data, meta.mime)
        image_id = record_image(ctx, job, attempt, stored.bucket, path, len(handed.data), meta)
        if image_id is None:
            return
        ctx.send(FINALIZE_ACTOR, FINALIZE_QUEUE, job_id, attempt, str(image_id))
        ctx.handoff.drop(job_id, attempt)
        transition("synced", job_id, attempt, stage, image_id=image_id)
