"""Dramatiq actors for the three stages; run with `dramatiq imagen.actors`.

Actors are thin: they unpack (job_id, attempt), and call the stage bodies in
`imagen.stages`. Retries with bounded exponential backoff, time limits and
metrics are Dramatiq middleware and actor options, configured here from the
environment. Queues are named per stage so operators can place each stage on
its own hosts: `dramatiq imagen.actors --queues imagen-generate`. A worker that
consumes all three queues runs sync and finalize in the generation message
(IMAGEN_CHAIN_STAGES, docs/decisions.md).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

from imagen.broker import (
    FINALIZE_ACTOR,
    FINALIZE_QUEUE,
    GENERATE_ACTOR,
    GENERATE_QUEUE,
    SYNC_ACTOR,
    SYNC_QUEUE,
    build_broker,
)
from imagen.config import Settings, load_settings
from imagen.db import preflight
from imagen.errors import ConfigError
from imagen.job_policy import JobPolicy
from imagen.logs import configure_logging
from imagen.presets import load_presets
from imagen.stages import (
    SYNC_TIME_LIMIT_S,
    StageContext,
    run_exhausted,
    run_finalize,
    run_generate,
    run_sync,
)

EXHAUSTED_ACTOR = "stage_exhausted"


class ChainStages(dramatiq.Middleware):
    """At boot, tells the stages which queues this worker consumes (`--queues`, all by default)."""

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        context.chain_for_worker(worker.consumer_whitelist or None)


class StopWaits(dramatiq.Middleware):
    """On SIGTERM, provider calls and simulated delays in progress get IMAGEN_SHUTDOWN_GRACE to end,
    then give up (their jobs are retried): a stop is bounded (docs/architecture.md, Shutdown)."""

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        context.stop()


class ReplayUsage(dramatiq.Middleware):
    """At boot, starts writing the usage records spooled while the database was away (this
    host's, a killed process's included), then keeps replaying every poll interval."""

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        context.replay_usage()


def _configure() -> tuple[Settings, dramatiq.Broker]:
    """Settings, logging and the broker the actors are defined on; a bad configuration exits 78."""
    try:
        settings = load_settings()
        # A database that can never work (unknown, wrong password, not migrated) stops the worker with
        # exit 78, which the systemd unit does not restart; one that is down is the stages' to retry.
        unreachable = preflight(settings.require_database_url())
        # A bad IMAGEN_JOB_BACKENDS, IMAGEN_JOB_OPENAI_QUALITIES or IMAGEN_PRESETS_FILE stops the
        # worker, instead of failing each job.
        JobPolicy.from_settings(settings)
        load_presets(settings.presets_file)
    except ConfigError as exc:
        print(f"imagen.actors: {exc}", file=sys.stderr)
        raise SystemExit(78) from None
    configure_logging(settings.log_format, settings.log_level)
    if unreachable is not None:
        logging.getLogger("imagen.actors").warning("%s; the stages retry until it answers", unreachable)
    broker = build_broker(settings)
    if settings.worker_metrics:
        from dramatiq.middleware.prometheus import Prometheus

        # Serves dramatiq_* metrics from a forked process on dramatiq_prom_host:dramatiq_prom_port (0.0.0.0:9191).
        broker.add_middleware(Prometheus())
    broker.add_middleware(ChainStages())
    broker.add_middleware(ReplayUsage())
    # The generation stage sends its own message again to wait for provider room (imagen.admission),
    # keeping the message's retry count: it needs the message it is running.
    broker.add_middleware(CurrentMessage())
    broker.add_middleware(StopWaits())
    dramatiq.set_broker(broker)
    return settings, broker


settings, broker = _configure()
context = StageContext(settings, broker)

_stage_options: dict[str, Any] = {"on_retry_exhausted": EXHAUSTED_ACTOR}
_short_limit = SYNC_TIME_LIMIT_S * 1000


@dramatiq.actor(actor_name=GENERATE_ACTOR, queue_name=GENERATE_QUEUE, **_stage_options)
def generate_stage(job_id: str, attempt: int, throttled_s: float = 0.0) -> None:
    """Generate the job's image with its backend and hand it to the sync stage."""
    try:
        run_generate(context, job_id, attempt, throttled_s=throttled_s)
    finally:
        context.release_memory()


@dramatiq.actor(actor_name=SYNC_ACTOR, queue_name=SYNC_QUEUE, time_limit=_short_limit, **_stage_options)
def sync_stage(job_id: str, attempt: int) -> None:
    """Upload the image and write its imagen.images row."""
    try:
        run_sync(context, job_id, attempt)
    finally:
        context.release_memory()


@dramatiq.actor(
    actor_name=FINALIZE_ACTOR, queue_name=FINALIZE_QUEUE, time_limit=_short_limit, **_stage_options
)
def finalize_stage(job_id: str, attempt: int, image_id: str) -> None:
    """Mark the job done and link its image."""
    run_finalize(context, job_id, attempt, image_id)


@dramatiq.actor(actor_name=EXHAUSTED_ACTOR, queue_name=FINALIZE_QUEUE, time_limit=_short_limit)
def stage_exhausted(message: dict[str, Any], retry_info: dict[str, Any]) -> None:
    """A stage ran out of retries: the job ends failed with its last error."""
    run_exhausted(context, message, retry_info)
