"""The Dramatiq broker imagen ships: Redis, with a wake-up instead of an idle sleep.

Dramatiq's Redis consumer sleeps between empty fetches with a backoff that grows
to `dramatiq_worker_timeout` (1 s by default), so an idle three-stage pipeline
pays up to a second per stage. Here every enqueue also pushes a token on a
per-queue wake list, and an idle consumer blocks on that list (BLPOP) for at
most the same timeout instead of sleeping. Everything else (fetch, ack, nack,
requeue, delays, heartbeats, maintenance) is Dramatiq's own Lua and code, so its
delivery semantics are unchanged; a lost token only costs the old idle timeout.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from uuid import uuid4

import dramatiq
import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, current_millis
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message
from dramatiq.middleware import AgeLimit, Retries, ShutdownNotifications, TimeLimit

from imagen.config import Settings

GENERATE_QUEUE = "imagen-generate"
SYNC_QUEUE = "imagen-sync"
FINALIZE_QUEUE = "imagen-finalize"
GENERATE_ACTOR = "generate_stage"
SYNC_ACTOR = "sync_stage"
FINALIZE_ACTOR = "finalize_stage"
MAX_WAKE_TOKENS = 64


class WakingRedisBroker(RedisBroker):
    """RedisBroker whose idle consumers wake as soon as a message is enqueued."""

    def wake_key(self, queue_name: str) -> str:
        return f"{self.namespace}:{queue_name}.wake"

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        return _WakingConsumer

    def do_enqueue(self, queue_name: str, message_id: str, data: bytes) -> None:
        """Dramatiq's own enqueue script and the wake token, sent in one round trip."""
        self._dispatch_enqueues(queue_name, [(message_id, data)])

    def enqueue_many(self, messages: Sequence[Message]) -> list[Message]:
        """Enqueue messages for one queue in one round trip, with one wake token per message (capped).

        Each message goes through the enqueue middleware as `enqueue` would send it; the
        listener forwards a whole claim batch this way. If it raises, any of them may or may
        not be in Redis, as with a single enqueue whose reply was lost.
        """
        if not messages:
            return []
        queue_name = messages[0].queue_name
        if any(m.queue_name != queue_name for m in messages):
            raise ValueError("enqueue_many takes messages for one queue")
        ready = [m.copy(options={"redis_message_id": str(uuid4())}) for m in messages]
        for message in ready:
            self.emit_before("enqueue", message, None)
        self._dispatch_enqueues(queue_name, [(m.options["redis_message_id"], m.encode()) for m in ready])
        for message in ready:
            self.emit_after("enqueue", message, None)
        return ready

    def _dispatch_enqueues(self, queue_name: str, items: Sequence[tuple[str, bytes]]) -> None:
        script = self.scripts["dispatch"]
        key = self.wake_key(queue_name)
        for _ in range(2):
            # EVALSHA by hand: a Script object in a pipeline costs a SCRIPT EXISTS round trip per call.
            pipe = self.client.pipeline(transaction=False)
            for message_id, data in items:
                args = [
                    "enqueue", current_millis(), queue_name, self.broker_id, self.heartbeat_timeout,
                    self.dead_message_ttl, self._should_do_maintenance("enqueue"), self._max_unpack_size(),
                    message_id, data,
                ]  # fmt: skip
                pipe.evalsha(script.sha, 1, self.namespace, *args)
            pipe.rpush(key, *([1] * min(len(items), MAX_WAKE_TOKENS)))
            # Tokens pile up while consumers are busy; a few spare wakes are harmless, an unbounded list is not.
            pipe.ltrim(key, -MAX_WAKE_TOKENS, -1)
            pipe.expire(key, 3600)
            try:
                pipe.execute()
                return
            except redis.exceptions.NoScriptError:
                # Redis restarted and forgot the script: load it and send again (the tokens are harmless twice).
                self.client.script_load(script.script)
        raise redis.exceptions.NoScriptError("dramatiq dispatch script could not be loaded")


class _WakingConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer with BLPOP on the wake list in place of its idle sleep."""

    def __next__(self) -> MessageProxy | None:
        try:
            while True:
                try:
                    data = self.message_cache.pop(0)
                    if data is None:
                        continue
                    self.misses = 0
                    message = Message.decode(data)
                    self.queued_message_ids.add(message.message_id)
                    return MessageProxy(message)
                except IndexError:
                    messages = []
                    if self.outstanding_message_count < self.prefetch:
                        self.message_cache = messages = self.broker.do_fetch(
                            self.queue_name,
                            self.prefetch - self.outstanding_message_count,
                        )
                    if messages:
                        continue
                    if self.outstanding_message_count >= self.prefetch:
                        # Full: nothing to wait for in Redis, the worker threads will free a slot.
                        self.misses, backoff_ms = compute_backoff(self.misses, max_backoff=self.timeout)
                        time.sleep(min(backoff_ms, 10) / 1000)
                        return None
                    self.broker.client.blpop(
                        [self.broker.wake_key(self.queue_name)], timeout=self.timeout / 1000
                    )
                    return None
        except redis.ConnectionError as e:
            raise ConnectionClosed(e) from None


def build_broker(settings: Settings) -> WakingRedisBroker:
    """The broker for workers and the listener, from IMAGEN_REDIS_URL.

    Retries (IMAGEN_STAGE_RETRIES, IMAGEN_RETRY_MIN/MAX_BACKOFF_MS) and the default time
    limit (IMAGEN_GENERATE_TIME_LIMIT; the shorter stages set theirs per actor) are built
    with their settings here, so nothing is patched after the fact.
    """
    # Dramatiq's default middleware without Callbacks and Pipelines: no imagen message uses
    # on_success/on_failure or pipe_target, and each costs work after every message.
    middleware = [
        AgeLimit(),
        TimeLimit(time_limit=int(settings.generate_time_limit * 1000)),
        ShutdownNotifications(),
        Retries(
            max_retries=settings.stage_retries,
            min_backoff=settings.retry_min_backoff_ms,
            max_backoff=settings.retry_max_backoff_ms,
        ),
    ]
    return WakingRedisBroker(url=settings.redis_url, middleware=middleware)


def stage_message(
    actor_name: str, queue_name: str, *args: object, kwargs: dict[str, object] | None = None
) -> Message:
    """A message for a stage actor, built without importing the actors (the listener stays small)."""
    return Message(
        queue_name=queue_name, actor_name=actor_name, args=tuple(args), kwargs=kwargs or {}, options={}
    )


__all__ = [
    "FINALIZE_ACTOR",
    "FINALIZE_QUEUE",
    "GENERATE_ACTOR",
    "GENERATE_QUEUE",
    "SYNC_ACTOR",
    "SYNC_QUEUE",
    "WakingRedisBroker",
    "build_broker",
    "dramatiq",
    "stage_message",
]
