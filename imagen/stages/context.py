"""The per-process resources of the stages, created on first use (after Dramatiq forks).

`StageContext` is what every stage body gets: settings, the broker, the job
store, storage, the hand-off, the provider gate and the usage sinks. The stages
reach the database only through `store` (imagen.store); a test passes an
`InMemoryJobStore`, a storage and a hand-off of its own to run them without
servers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cached_property
from typing import Any

import redis

from imagen.admission import Gate, GatedBackends
from imagen.broker import FINALIZE_QUEUE, SYNC_QUEUE, stage_message
from imagen.config import Settings
from imagen.handoff import Handoff
from imagen.job_policy import JobPolicy, check_generation
from imagen.quotas import QuotaBook
from imagen.stages.lease import Heartbeater
from imagen.storage import Storage, open_storage
from imagen.store.base import JobStore
from imagen.usage import DatabaseSink
from imagen.usage_spool import SpoolReplayer, UsageSpool

# After a job whose image had more pixels than this, freed memory is handed back to the system
# (`StageContext.release_memory`): glibc keeps what threads freed in their arenas otherwise,
# and a worker that rendered 50 large images kept most of its peak (issue 14).
LARGE_IMAGE = 1024 * 1024

# Dramatiq time limit of the sync and finalize actors: they do I/O only, and a stuck upload
# should not hold a job for the whole lease. A chained sync gets at least as long.
SYNC_TIME_LIMIT_S = 120


class StageContext:
    """Per-process resources for the stages, created on first use (after Dramatiq forks).

    `store`, `storage` and `handoff` may be given (tests); otherwise they are built from
    the settings when first used: a pooled PostgreSQL store, the configured storage, Redis.
    `clock` is what the stages' time limits are measured on (time.monotonic, or a test's).
    """

    def __init__(
        self,
        settings: Settings,
        broker: Any,
        *,
        store: JobStore | None = None,
        storage: Storage | None = None,
        handoff: Handoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.broker = broker
        # The stages' clock: time limits, the shutdown deadline, the heartbeat. A test passes its own.
        self.clock = clock
        # Set at worker boot (`chain_for_worker`): off until a worker says it consumes every stage's queue.
        self.chain_stages = False
        # Set when the worker starts shutting down (SIGTERM, `stop`): waits in progress give up
        # once IMAGEN_SHUTDOWN_GRACE has passed, so a stop is bounded (docs/architecture.md).
        self.stop_deadline: float | None = None
        self.trim_wanted = False
        # Given resources take the place of the cached properties below.
        given = {"store": store, "storage": storage, "handoff": handoff}
        self.__dict__.update({name: value for name, value in given.items() if value is not None})

    def release_memory(self) -> None:
        """Return freed memory to the system after a large image (the actor calls it once the stage's
        own references are gone). glibc only; a no-op elsewhere."""
        if not self.trim_wanted:
            return
        self.trim_wanted = False
        _malloc_trim()

    def note_pixels(self, pixels: int) -> None:
        """The stage holds an image this large: release memory after it if it is a large one."""
        if pixels > LARGE_IMAGE:
            self.trim_wanted = True

    def stop(self) -> None:
        """The worker is shutting down: calls in progress get the shutdown grace, then are abandoned."""
        self.stop_deadline = self.clock() + self.settings.shutdown_grace

    def chain_for_worker(self, queues: set[str] | None) -> None:
        """Chain the stages in one message when this worker would consume all their messages anyway."""
        consumes_all = not queues or {SYNC_QUEUE, FINALIZE_QUEUE} <= queues
        self.chain_stages = self.settings.chain_stages and consumes_all

    @cached_property
    def store(self) -> JobStore:
        from imagen.store.postgres import PostgresJobStore

        return PostgresJobStore.pooled(self.settings.require_database_url(), application_name="imagen-actors")

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
        return Heartbeater(self.store, self.settings.lease_seconds, clock=self.clock)

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
        return DatabaseSink(self.store, spool=self.usage_spool)

    def replay_usage(self) -> SpoolReplayer:
        """Write the host's spooled usage records now (at worker boot) and every poll interval after."""
        replayer = SpoolReplayer(self.usage_spool, self.store.replay_usage, self.settings.poll_interval)
        replayer.start()
        return replayer

    @cached_property
    def presets(self) -> Any:
        from imagen.presets import load_presets

        return load_presets(self.settings.presets_file)

    def send(self, actor: str, queue: str, *args: object, delay_ms: int = 0) -> None:
        self.broker.enqueue(stage_message(actor, queue, *args), delay=delay_ms or None)

    def close(self) -> None:
        if "store" in self.__dict__:
            self.store.close()


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
