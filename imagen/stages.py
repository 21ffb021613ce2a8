"""The three stage bodies: generation, cloud sync, finalize. Actors call these.

Every stage starts with a fenced write; a message whose fence fails is dropped
with a log line, so redelivered or rescued work never overwrites newer state.
Permanent errors fail the job here at once; transient ones are noted on the
row and re-raised for Dramatiq's Retries middleware, which owns backoff. The
effects are idempotent per job: one deterministic object path (upsert) and one
images row (UNIQUE job_id, ON CONFLICT), however often a stage runs; the images
statements match on the job's id and owner, so a stage never touches another
owner's row (imagen.job_images).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from typing import Any
from uuid import UUID

import psycopg
import redis

from imagen import interrupts, job_images, jobs
from imagen.admission import Deferred, Gate, GatedBackends, Wait, check_quota, deferral
from imagen.broker import (
    FINALIZE_ACTOR,
    FINALIZE_QUEUE,
    GENERATE_ACTOR,
    GENERATE_QUEUE,
    SYNC_ACTOR,
    SYNC_QUEUE,
    stage_message,
)
from imagen.config import Settings
from imagen.errors import ImagenError
from imagen.handoff import Handoff
from imagen.heartbeat import Heartbeater, heartbeating, own_limit, stop_check
from imagen.image_sweep import discard_ended
from imagen.job_policy import JobPolicy, check_generation
from imagen.logs import transition
from imagen.params import spec_from_params
from imagen.quotas import QuotaBook
from imagen.storage import Storage, job_object_path, open_storage
from imagen.usage import DatabaseSink, HeldSink
from imagen.usage_spool import SpoolReplayer, UsageSpool

log = logging.getLogger(__name__)

# After a job whose image had more pixels than this, freed memory is handed back to the system
# (`StageContext.release_memory`): glibc keeps what threads freed in their arenas otherwise,
# and a worker that rendered 50 large images kept most of its peak (issue 14).
LARGE_IMAGE = 1024 * 1024

STAGE_LABELS = {"generating": "generation", "syncing": "sync", "finalizing": "finalize"}
# Dramatiq time limit of the sync and finalize actors: they do I/O only, and a stuck upload
# should not hold a job for the whole lease. A chained sync gets at least as long.
SYNC_TIME_LIMIT_S = 120


class StageContext:
    """Per-process resources for the stages, created on first use (after Dramatiq forks)."""

    def __init__(self, settings: Settings, broker: Any) -> None:
        self.settings = settings
        self.broker = broker
        # Set at worker boot (`chain_for_worker`): off until a worker says it consumes every stage's queue.
        self.chain_stages = False
        # Set when the worker starts shutting down (SIGTERM, `stop`): waits in progress give up
        # once IMAGEN_SHUTDOWN_GRACE has passed, so a stop is bounded (docs/architecture.md).
        self.stop_deadline: float | None = None
        self.trim_wanted = False

    def release_memory(self) -> None:
        """Return freed memory to the system after a large image (the actor calls it once the stage's
        own references are gone). glibc only; a no-op elsewhere."""
        if not self.trim_wanted:
            return
        self.trim_wanted = False
        _malloc_trim()

    def stop(self) -> None:
        """The worker is shutting down: calls in progress get the shutdown grace, then are abandoned."""
        self.stop_deadline = time.monotonic() + self.settings.shutdown_grace

    def chain_for_worker(self, queues: set[str] | None) -> None:
        """Chain the stages in one message when this worker would consume all their messages anyway."""
        consumes_all = not queues or {SYNC_QUEUE, FINALIZE_QUEUE} <= queues
        self.chain_stages = self.settings.chain_stages and consumes_all

    @cached_property
    def pool(self) -> Any:
        from psycopg_pool import ConnectionPool

        return ConnectionPool(
            self.settings.require_database_url(),
            min_size=1,
            max_size=16,
            kwargs={"autocommit": True, "application_name": "imagen-actors"},
            open=True,
            # No per-checkout health check: it would add a round trip to every statement. A connection
            # that died with the server fails its next use, the stage is retried, the pool replaces it.
        )

    @cached_property
    def policy(self) -> JobPolicy:
        return JobPolicy.from_settings(self.settings)

    def check_job(self, backend: Any, spec: Any) -> None:
        """The operator's job policy on a resolved spec, before the provider is called."""
        check_generation(self.policy, backend, spec)

    @cached_property
    def gate(self) -> Gate:
        """Provider admission shared with every worker through Redis (imagen.admission)."""
        return Gate(self.settings, redis.Redis.from_url(self.settings.redis_url))

    @cached_property
    def backends(self) -> GatedBackends:
        """Backend instances of this process, each behind the gate."""
        return GatedBackends(self.gate)

    @cached_property
    def quota_book(self) -> QuotaBook:
        return QuotaBook(self.settings.owner_daily_images, self.settings.owner_daily_cost_usd)

    @cached_property
    def heartbeater(self) -> Heartbeater:
        return Heartbeater(self)

    @cached_property
    def handoff(self) -> Handoff:
        client = redis.Redis.from_url(self.settings.redis_url)
        return Handoff(client, self.settings.handoff_ttl)

    @cached_property
    def storage(self) -> Storage:
        return open_storage(self.settings)

    @cached_property
    def usage_spool(self) -> UsageSpool:
        return UsageSpool(self.settings.usage_spool_dir)

    @cached_property
    def usage_sink(self) -> DatabaseSink:
        # A row the database did not take waits in the spool; `replay_usage` writes it later.
        return DatabaseSink(self.pool.connection, spool=self.usage_spool)

    def replay_usage(self) -> None:
        """Write the host's spooled usage records now (at worker boot) and every poll interval after."""
        SpoolReplayer(self.usage_spool, self.pool.connection, self.settings.poll_interval).start()

    @cached_property
    def presets(self) -> Any:
        from imagen.presets import load_presets

        return load_presets(self.settings.presets_file)

    def send(self, actor: str, queue: str, *args: object, delay_ms: int = 0) -> None:
        self.broker.enqueue(stage_message(actor, queue, *args), delay=delay_ms or None)

    def close(self) -> None:
        if "pool" in self.__dict__:
            self.pool.close()


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _drop(ctx: StageContext, job_id: str, attempt: int, stage: str) -> None:
    with ctx.pool.connection() as conn:
        _log_drop(job_id, attempt, stage, jobs.job_state(conn, job_id))


def _log_drop(job_id: str, attempt: int, stage: str, state: tuple[str, int] | None) -> None:
    why = "job not found" if state is None else f"job is {state[0]} at attempt {state[1]}"
    transition("dropped", job_id, attempt, stage, reason=why)


def _fail(ctx: StageContext, job_id: str, attempt: int, stage: str, error: str) -> None:
    with ctx.pool.connection() as conn:
        failed = jobs.fail_job(conn, job_id, attempt, error)
    if failed:
        transition("failed", job_id, attempt, stage, error=error)
    else:
        _drop(ctx, job_id, attempt, stage)


def _note_transient(ctx: StageContext, job_id: str, attempt: int, stage: str, exc: BaseException) -> None:
    label = STAGE_LABELS.get(stage, stage)
    text = f"{label}: {exc}" if isinstance(exc, ImagenError) else f"{label}: {type(exc).__name__}: {exc}"
    if isinstance(exc, psycopg.OperationalError):
        # The server dropped connections (a restart, a failover, a terminated backend): the pool's
        # idle ones are likely dead too. Test them now, or each retry may draw the next dead one.
        ctx.pool.check()
    try:
        with ctx.pool.connection() as conn:
            jobs.note_transient(conn, job_id, attempt, text)
    except psycopg.Error:
        log.warning("could not record transient error for job %s", job_id)
    transition("retrying", job_id, attempt, stage, error=text)


@contextmanager
def guarded(ctx: StageContext, job_id: str, attempt: int, stage: str) -> Iterator[None]:
    """Translate errors once: permanent -> failed now; transient or unknown -> noted, re-raised for retry."""
    try:
        yield
    except ImagenError as exc:
        # Ours are typed at the edge: anything not marked transient (bad params, a refused prompt,
        # bad credentials, storage 4xx, configuration) cannot succeed on a retry.
        if exc.is_transient:
            _note_transient(ctx, job_id, attempt, stage, exc)
            raise
        _fail(ctx, job_id, attempt, stage, f"{STAGE_LABELS.get(stage, stage)} failed: {exc}")
    except Exception as exc:
        # A dropped connection or a bug: retried with backoff, then failed with this text.
        _note_transient(ctx, job_id, attempt, stage, exc)
        raise


def run_generate(ctx: StageContext, job_id: str, attempt: int, *, throttled_s: float = 0.0) -> None:
    """Generation stage: fence, validate, admit, run the pipeline, then sync (chained) or hand the image on.

    `throttled_s` is how long the provider has kept this attempt waiting so far (429s,
    Retry-After); a job sent again to wait for room carries it (docs/operations.md).
    """
    from imagen.pipeline import generate, seed_for_job

    stage = "generating"
    started = time.monotonic()
    with ctx.pool.connection() as conn:
        job = jobs.begin_stage(conn, job_id, attempt, stage)
    if job is None:
        _drop(ctx, job_id, attempt, stage)
        return
    transition("started", job_id, attempt, stage)
    # Chained, a successful call's usage row goes with the statement that ends the job; any other
    # way out writes it on its own before the job's state changes (`_usage_first`, the hand-off).
    held = HeldSink() if ctx.chain_stages else None
    generated: tuple[bytes, dict[str, Any]] | None = None
    with guarded(ctx, job_id, attempt, stage), _usage_first(ctx, held):
        spec = spec_from_params(job.prompt, jobs.load_params(job.params_json), ctx.policy)
        if spec.seed is None:
            spec = replace(spec, seed=seed_for_job(job.job_id))
        with ctx.pool.connection() as conn:
            check_quota(ctx.quota_book, conn, job.owner_user_id, spec.n, job_id=job_id, attempt=attempt)
        out_dir = ctx.settings.output_dir / "jobs" if ctx.settings.keep_local_copy else None
        limit = own_limit(ctx.settings.generate_time_limit) - (time.monotonic() - started)
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
                _send_again(ctx, job_id, attempt, wait)
                return
        image = result.images[0]
        if image.width * image.height > LARGE_IMAGE:
            ctx.trim_wanted = True
        meta = {
            "mime": image.mime, "width": image.width, "height": image.height, "backend": result.backend,
            "model": result.model, "prompt": result.prompt, "preset": result.preset, "params": result.params,
        }  # fmt: skip
        transition("generated", job_id, attempt, stage, backend=result.backend, model=result.model)
        # Chained, the upload runs under this message's time limit: only with a sync stage's whole
        # limit left, or a slow provider call could leave the upload too little and cost a rerun.
        left = ctx.settings.generate_time_limit - (time.monotonic() - started)
        if not ctx.chain_stages or left < SYNC_TIME_LIMIT_S:
            if held is not None:
                held.release(ctx.usage_sink)
            _hand_off(ctx, job_id, attempt, image.data, meta)
            return
        generated = (image.data, meta)
    if generated is not None:
        _sync_chained(ctx, job, attempt, *generated, held=held, stage_started=started)


def _send_again(ctx: StageContext, job_id: str, attempt: int, wait: Wait) -> None:
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


@contextmanager
def _usage_first(ctx: StageContext, held: HeldSink | None) -> Iterator[None]:
    """On an error, write the held usage row before the error is handled (the job failed or retried),
    so whoever sees the job's new state also sees what its provider call cost."""
    try:
        yield
    except BaseException:
        if held is not None:
            held.release(ctx.usage_sink)
        raise


def _hand_off(
    ctx: StageContext, job_id: str, attempt: int, data: bytes, meta: dict[str, Any], *, delay_ms: int = 0
) -> None:
    ctx.handoff.put(job_id, attempt, data, meta)
    ctx.send(SYNC_ACTOR, SYNC_QUEUE, job_id, attempt, delay_ms=delay_ms)


def _sync_chained(
    ctx: StageContext,
    job: jobs.RunningJob,
    attempt: int,
    data: bytes,
    meta: dict[str, Any],
    *,
    held: HeldSink | None = None,
    stage_started: float,
) -> None:
    """Sync and finalize in the generation message: no hand-off, two hops and two fenced writes fewer.

    Safe to crash anywhere for the same reasons as the separate stages (one object path, one
    images row, one fenced statement that writes the row and ends the job). A failed upload
    must not repeat the provider call, so a transient error sends the image on to the sync
    stage's own message, whose retries own the backoff from there.
    """
    job_id = str(job.job_id)
    stage = "syncing"
    started = time.monotonic()
    try:
        with guarded(ctx, job_id, attempt, stage), _usage_first(ctx, held):
            path = job_object_path(job.owner_user_id, job.job_id, meta["mime"])
            limit = ctx.settings.generate_time_limit - (time.monotonic() - stage_started)
            with heartbeating(ctx, job_id, attempt, limit):
                stored = ctx.storage.put(path, data, meta["mime"])
            took = time.monotonic() - started
            image_id = _record_image(
                ctx, job, attempt, stored.bucket, path, len(data), meta, complete_after=took, held=held
            )
            if image_id is not None:
                transition("synced", job_id, attempt, stage, image_id=image_id)
                transition("done", job_id, attempt, "finalizing", image_id=image_id)
    except Exception:
        # guarded() noted the error on the row; a failing hand-off retries the generation instead.
        with guarded(ctx, job_id, attempt, "generating"):
            _hand_off(ctx, job_id, attempt, data, meta, delay_ms=ctx.settings.retry_min_backoff_ms)


def run_sync(ctx: StageContext, job_id: str, attempt: int) -> None:
    """Cloud-sync stage: upload at the job's one path (upsert), write the images row once."""
    stage = "syncing"
    with ctx.pool.connection() as conn:
        job, existing = job_images.begin_sync(conn, job_id, attempt)
    if job is None:
        # This attempt is over (cancelled, rescued or ended): its hand-off can never be used.
        ctx.handoff.drop(job_id, attempt)
        _drop(ctx, job_id, attempt, stage)
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
        if meta["width"] * meta["height"] > LARGE_IMAGE:
            ctx.trim_wanted = True
        path = job_object_path(job.owner_user_id, job.job_id, meta["mime"])
        stored = ctx.storage.put(path, handed.data, meta["mime"])
        image_id = _record_image(ctx, job, attempt, stored.bucket, path, len(handed.data), meta)
        if image_id is None:
            return
        ctx.send(FINALIZE_ACTOR, FINALIZE_QUEUE, job_id, attempt, str(image_id))
        ctx.handoff.drop(job_id, attempt)
        transition("synced", job_id, attempt, stage, image_id=image_id)


def _record_image(
    ctx: StageContext,
    job: jobs.RunningJob,
    attempt: int,
    bucket: str,
    path: str,
    size: int,
    meta: dict[str, Any],
    *,
    complete_after: float | None = None,
    held: HeldSink | None = None,
) -> UUID | None:
    job_id = str(job.job_id)
    usage = held.sole() if held is not None else None
    with ctx.pool.connection() as conn:
        image_id = job_images.record_job_image(
            conn,
            attempt,
            {
                "job_id": job.job_id, "bucket": bucket,
                "path": path, "mime": meta["mime"], "width": meta["width"], "height": meta["height"],
                "bytes": size, "prompt": meta["prompt"], "backend": meta["backend"],
                "model": meta["model"], "params": meta["params"],
            },
            complete_after=complete_after,
            usage=usage,
        )  # fmt: skip
        if held is not None and usage is not None:
            held.written()  # fence or not
        if image_id is not None:
            return image_id
        # The job moved on while we uploaded. If it ended failed or cancelled, our object goes,
        # decided under the job's row lock (a retry waits; a newer attempt's job is left alone).
        _discard_ended(ctx, conn, job_id)
        state = jobs.job_state(conn, job_id)
    _log_drop(job_id, attempt, "syncing", state)
    return None


def _discard_ended(ctx: StageContext, conn: Any, job_id: str) -> None:
    """A job that ended failed or cancelled keeps no image; whatever this fails to remove, the
    listener's sweep removes later."""
    try:
        discard_ended(conn, job_id, ctx.storage)
    except ImagenError as exc:
        log.warning("could not remove the image of ended job %s: %s; the sweep will", job_id, exc)


def run_finalize(ctx: StageContext, job_id: str, attempt: int, image_id: str) -> None:
    """Final stage: done + image_id in one conditional UPDATE."""
    with ctx.pool.connection() as conn:
        done = jobs.complete_job(conn, job_id, attempt, image_id)
        if not done:
            # Cancelled (or failed) between the images row and this stage: a job that is not done
            # keeps no image. A newer attempt of a running job is left alone: it reuses the row.
            _discard_ended(ctx, conn, job_id)
    if done:
        transition("done", job_id, attempt, "finalizing", image_id=image_id)
        return
    _drop(ctx, job_id, attempt, "finalizing")


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
    with ctx.pool.connection() as conn:
        row = jobs.get_job(conn, job_id)
    last = (row or {}).get("last_error") or _last_line(message.get("options", {}).get("traceback"))
    tries = int(retry_info.get("retries", 0)) + 1
    _fail(ctx, job_id, attempt, stage, f"{stage} gave up after {tries} tries: {last or 'unknown error'}")


def _last_line(traceback: str | None) -> str | None:
    if not traceback:
        return None
    lines = [line for line in traceback.strip().splitlines() if line.strip()]
    return lines[-1] if lines else None
