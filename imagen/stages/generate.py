"""The generation stage: fence, validate, admit, call the provider, then hand the image on.

Every stage starts with a fenced write; a message whose fence fails is dropped
with a log line, so redelivered or rescued work never overwrites newer state.
The image goes to the sync stage through the hand-off (Redis, per attempt), or,
on a worker that consumes every stage's queue, on to the chained sync in this
same message (imagen.stages.chained).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from imagen import interrupts
from imagen.admission import Deferred, Wait, check_quota, deferral
from imagen.broker import GENERATE_ACTOR, GENERATE_QUEUE, stage_message
from imagen.errors import ImagenError
from imagen.logs import transition
from imagen.params import load_params, spec_from_params
from imagen.stages.chained import sync_chained
from imagen.stages.context import SYNC_TIME_LIMIT_S, StageContext
from imagen.stages.errors import drop, guarded, usage_first
from imagen.stages.lease import heartbeating, own_limit, stop_check
from imagen.stages.sync import hand_off
from imagen.store.rows import ImageMeta
from imagen.usage import HeldSink

log = logging.getLogger("imagen.stages")


def run_generate(ctx: StageContext, job_id: str, attempt: int, *, throttled_s: float = 0.0) -> None:
    """Generation stage: fence, validate, admit, run the pipeline, then sync (chained) or hand the image on.

    `throttled_s` is how long the provider has kept this attempt waiting so far (429s,
    Retry-After); a job sent again to wait for room carries it (docs/operations.md).
    """
    from imagen.pipeline import generate, seed_for_job

    stage = "generating"
    started = ctx.clock()
    job = ctx.store.begin_stage(job_id, attempt, stage)
    if job is None:
        drop(ctx, job_id, attempt, stage)
        return
    transition("started", job_id, attempt, stage)
    # Chained, a successful call's usage row goes with the statement that ends the job; any other
    # way out writes it on its own before the job's state changes (`usage_first`, the hand-off).
    held = HeldSink() if ctx.chain_stages else None
    generated: tuple[bytes, ImageMeta] | None = None
    with guarded(ctx, job_id, attempt, stage), usage_first(ctx, held):
        spec = spec_from_params(job.prompt, load_params(job.params_json), ctx.policy)
        if spec.seed is None:
            spec = replace(spec, seed=seed_for_job(job.job_id))
        check_quota(ctx.quota_book, ctx.store, job.owner_user_id, spec.n, job_id=job_id, attempt=attempt)
        out_dir = ctx.settings.output_dir / "jobs" if ctx.settings.keep_local_copy else None
        limit = own_limit(ctx.settings.generate_time_limit) - (ctx.clock() - started)
        with heartbeating(ctx, job_id, attempt, limit) as beat, interrupts.stoppable(stop_check(ctx, beat)):
            try:
                result = generate(
                    spec, ctx.settings, sink=held or ctx.usage_sink, out_dir=out_dir,
                    owner_user_id=job.owner_user_id, job_id=job.job_id, presets=ctx.presets, backends=ctx.backends,
                    check=ctx.check_job,
                )  # fmt: skip
            except (Deferred, ImagenError) as exc:
                wait = deferral(exc, throttled_s, ctx.settings)  # raises ThrottleExhausted past the limit
                if wait is None:
                    raise
                if held is not None:
                    held.release(ctx.usage_sink)
                send_again(ctx, job_id, attempt, wait)
                return
        image = result.images[0]
        ctx.note_pixels(image.width * image.height)
        meta = ImageMeta(
            mime=image.mime, width=image.width, height=image.height, backend=result.backend,
            model=result.model, prompt=result.prompt, preset=result.preset, params=result.params,
        )  # fmt: skip
        transition("generated", job_id, attempt, stage, backend=result.backend, model=result.model)
        # Chained, the upload runs under this message's time limit: only with a sync stage's whole
        # limit left, or a slow provider call could leave the upload too little and cost a rerun.
        left = ctx.settings.generate_time_limit - (ctx.clock() - started)
        if not ctx.chain_stages or left < SYNC_TIME_LIMIT_S:
            if held is not None:
                held.release(ctx.usage_sink)
            hand_off(ctx, job_id, attempt, image.data, meta)
            return
        generated = (image.data, meta)
    if generated is not None:
        sync_chained(ctx, job, attempt, *generated, held=held, stage_started=started)


def send_again(ctx: StageContext, job_id: str, attempt: int, wait: Wait) -> None:
    """The generation message again after the wait: same job, attempt and retry count, no try used."""
    from dramatiq.middleware import CurrentMessage

    kwargs: dict[str, object] = {"throttled_s": round(wait.throttled_s, 3)}
    current = CurrentMessage.get_current_message()
    if current is not None and current.actor_name == GENERATE_ACTOR:
        # A copy keeps the message's options, the Retries middleware's count among them.
        message = current.copy(queue_name=GENERATE_QUEUE, kwargs=kwargs)
    else:
        message = stage_message(GENERATE_ACTOR, GENERATE_QUEUE, job_id, attempt, kwargs=kwargs)
    ctx.broker.enqueue(message, delay=max(1, int(wait.delay_s * 1000)))
    if wait.is_provider:
        transition(
            "throttled", job_id, attempt, "generating", reason=wait.reason,
            again_in_s=round(wait.delay_s, 1), waited_s=round(wait.throttled_s, 1),
        )  # fmt: skip
    else:
        log.debug("job %s waits %.1f s for room: %s", job_id, wait.delay_s, wait.reason)
