"""Image bytes between stages: Redis keys with a TTL, never Dramatiq messages.

The generation stage may run on one host and the sync stage on another; both
reach the same Redis. A key is per (job, attempt), so a rescued attempt never
reads an older attempt's image, and the TTL guarantees nothing is left behind
when a job is cancelled or abandoned between stages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from uuid import UUID

import redis

from imagen.errors import TransientError
from imagen.store.rows import ImageMeta

PREFIX = "imagen:handoff"


@dataclass(frozen=True)
class HandedOff:
    """One generated image waiting for the sync stage."""

    data: bytes
    meta: ImageMeta


def handoff_key(job_id: UUID | str, attempt: int) -> str:
    return f"{PREFIX}:{job_id}:{attempt}"


class Handoff:
    """Put, take and drop hand-off entries in Redis."""

    def __init__(self, client: redis.Redis, ttl_seconds: int) -> None:
        self.client = client
        self.ttl = ttl_seconds

    def put(self, job_id: UUID | str, attempt: int, data: bytes, meta: ImageMeta) -> None:
        key = handoff_key(job_id, attempt)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(key, mapping={"data": data, "meta": json.dumps(meta.to_json(), default=str)})
            pipe.expire(key, self.ttl)
            pipe.execute()
        except redis.RedisError as exc:
            raise TransientError(f"hand-off to Redis failed: {exc}") from None

    def get(self, job_id: UUID | str, attempt: int) -> HandedOff | None:
        try:
            values = self.client.hmget(handoff_key(job_id, attempt), ["data", "meta"])
        except redis.RedisError as exc:
            raise TransientError(f"reading the hand-off from Redis failed: {exc}") from None
        data, meta = values
        if data is None or meta is None:
            return None
        return HandedOff(
            data=data if isinstance(data, bytes) else data.encode(),
            meta=ImageMeta.from_json(json.loads(meta)),
        )

    def drop(self, job_id: UUID | str, attempt: int) -> None:
        try:
            self.client.delete(handoff_key(job_id, attempt))
        except redis.RedisError:
            pass  # the TTL removes it anyway
