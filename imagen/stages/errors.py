"""Error translation of the stages: what a stage's error does to its job, decided in one place.

Permanent errors (ours, typed at the edge: bad params, a refused prompt, bad
credentials, storage 4xx, configuration) fail the job at once: a retry cannot
help. Transient and unknown ones are noted on the row (`last_error`) and
re-raised for Dramatiq's Retries middleware, which owns backoff. A write whose
fence fails is logged as a drop: the attempt is no longer the job's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from imagen.errors import ImagenError
from imagen.logs import transition
from imagen.usage import HeldSink

if TYPE_CHECKING:
    from imagen.stages.context import StageContext

log = logging.getLogger("imagen.stages")

LABELS = {"generating": "generation", "syncing": "sync", "finalizing": "finalize"}


def label(stage: str) -> str:
    """The stage's name in a job's error text: `generation failed: ...`."""
    return LABELS.get(stage, stage)


def drop(ctx: StageContext, job_id: str, attempt: int, stage: str) -> None:
    """The message's attempt no longer holds the job: log why, do nothing else."""
    log_drop(job_id, attempt, stage, ctx.store.job_state(job_id))


def log_drop(job_id: str, attempt: int, stage: str, state: tuple[str, int] | None) -> None:
    why = "job not found" if state is None else f"job is {state[0]} at attempt {state[1]}"
    transition("dropped", job_id, attempt, stage, reason=why)


def fail(ctx: StageContext, job_id: str, attempt: int, stage: str, error: str) -> None:
    """End the job failed with `error`, if this attempt still holds it."""
    if ctx.store.fail_job(job_id, attempt, error):
        transition("failed", job_id, attempt, stage, error=error)
    else:
        drop(ctx, job_id, attempt, stage)


def note_transient(ctx: StageContext, job_id: str, attempt: int, stage: str, exc: BaseException) -> None:
    """Remember a retryable error on the job, so one that runs out of retries can say why."""
    text = (
        f"{label(stage)}: {exc}"
        if isinstance(exc, ImagenError)
        else f"{label(stage)}: {type(exc).__name__}: {exc}"
    )
    ctx.store.recover(exc)
    try:
        ctx.store.note_transient(job_id, attempt, text)
    except ctx.store.errors:
        log.warning("could not record transient error for job %s", job_id)
    transition("retrying", job_id, attempt, stage, error=text)


@contextmanager
def guarded(ctx: StageContext, job_id: str, attempt: int, stage: str) -> Iterator[None]:
    """Translate errors once: permanent -> failed now; transient or unknown -> noted, re-raised for retry."""
    try:
        yield
    except ImagenError as exc:
        # Ours are typed at the edge: anything not marked transient cannot succeed on a retry.
        if exc.is_transient:
            note_transient(ctx, job_id, attempt, stage, exc)
            raise
        fail(ctx, job_id, attempt, stage, f"{label(stage)} failed: {exc}")
    except Exception as exc:
        # A dropped connection or a bug: retried with backoff, then failed with this text.
        note_transient(ctx, job_id, attempt, stage, exc)
        raise


@contextmanager
def usage_first(ctx: StageContext, held: HeldSink | None) -> Iterator[None]:
    """On an error, write the held usage row before the error is handled (the job failed or retried),
    so whoever sees the job's new state also sees what its provider call cost."""
    try:
        yield
    except BaseException:
        if held is not None:
            held.release(ctx.usage_sink)
        raise
