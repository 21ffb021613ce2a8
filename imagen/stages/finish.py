"""The final stage and the end of a stage out of retries.

Finalize marks the job done and links its image in one fenced write; a job that
was cancelled (or failed) between its images row and this stage keeps no image.
A stage that ran out of Dramatiq's retries fails the job with the last error it
saw, so no job stays `running` once its messages are gone.
"""

from __future__ import annotations

import logging
from typing import Any

from imagen.broker import FINALIZE_ACTOR, GENERATE_ACTOR, SYNC_ACTOR
from imagen.logs import transition
from imagen.stages.context import StageContext
from imagen.stages.errors import drop, fail
from imagen.stages.images import discard_ended

log = logging.getLogger("imagen.stages")


def run_finalize(ctx: StageContext, job_id: str, attempt: int, image_id: str) -> None:
    """Final stage: done + image_id in one conditional UPDATE."""
    if ctx.store.complete_job(job_id, attempt, image_id):
        transition("done", job_id, attempt, "finalizing", image_id=image_id)
        return
    # Cancelled (or failed) between the images row and this stage: a job that is not done
    # keeps no image. A newer attempt of a running job is left alone: it reuses the row.
    discard_ended(ctx, job_id)
    drop(ctx, job_id, attempt, "finalizing")


def run_exhausted(ctx: StageContext, message: dict[str, Any], retry_info: dict[str, Any]) -> None:
    """A stage ran out of retries: fail the job with the last error it saw."""
    args = message.get("args") or []
    if len(args) < 2:
        log.error("retry-exhausted message without (job_id, attempt): %r", message.get("actor_name"))
        return
    job_id, attempt = str(args[0]), int(args[1])
    stage = {GENERATE_ACTOR: "generation", SYNC_ACTOR: "sync", FINALIZE_ACTOR: "finalize"}.get(
        message.get("actor_name", ""), "stage"
    )
    row = ctx.store.get_job(job_id)
    last = (row or {}).get("last_error") or _last_line(message.get("options", {}).get("traceback"))
    tries = int(retry_info.get("retries", 0)) + 1
    fail(ctx, job_id, attempt, stage, f"{stage} gave up after {tries} tries: {last or 'unknown error'}")


def _last_line(traceback: str | None) -> str | None:
    if not traceback:
        return None
    lines = [line for line in traceback.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None
