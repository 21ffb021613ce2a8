"""Queue depths per stage, read straight from Dramatiq's Redis keys (never written).

Dramatiq's Redis broker keeps, per queue Q in its namespace: the list `Q` of
message ids waiting, the hash `Q.msgs` of every message not yet acknowledged
(waiting, or fetched by a worker and in progress or prefetched), the list
`Q.DQ` of messages waiting out a retry delay, and the sorted set `Q.XQ` of
dead-lettered ones (dramatiq/brokers/redis/dispatch.lua).
"""

from __future__ import annotations

from dataclasses import dataclass

from imagen.broker import FINALIZE_QUEUE, GENERATE_QUEUE, SYNC_QUEUE

NAMESPACE = "dramatiq"
STAGE_QUEUES = (("generate", GENERATE_QUEUE), ("sync", SYNC_QUEUE), ("finalize", FINALIZE_QUEUE))


@dataclass(frozen=True)
class QueueDepth:
    """One stage's queue in Redis."""

    stage: str
    queue: str
    waiting: int
    taken: int
    delayed: int
    dead: int


def queue_depths(redis_url: str, *, timeout: float = 1.0) -> list[QueueDepth]:
    """Each stage queue's depth; raises redis errors (the caller shows them as "Redis unreachable")."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        with client.pipeline(transaction=False) as pipe:
            for _, queue in STAGE_QUEUES:
                full = f"{NAMESPACE}:{queue}"
                pipe.llen(full)
                pipe.hlen(f"{full}.msgs")
                pipe.llen(f"{full}.DQ")
                pipe.hlen(f"{full}.DQ.msgs")
                pipe.zcard(f"{full}.XQ")
            values = [int(v) for v in pipe.execute()]
    finally:
        client.close()
    depths = []
    for i, (stage, queue) in enumerate(STAGE_QUEUES):
        waiting, unacked, delayed, delayed_unacked, dead = values[i * 5 : i * 5 + 5]
        depths.append(
            QueueDepth(
                stage=stage,
                queue=queue,
                waiting=waiting,
                taken=max(0, unacked - waiting),
                delayed=max(delayed, delayed_unacked),
                dead=dead,
            )
        )
    return depths
