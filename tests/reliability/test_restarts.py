"""Redis and PostgreSQL restarted under a running backlog.

The servers are this module's own (harness.Servers), restarted on the same port.
Redis keeps nothing on disk, so a restart loses every queued message and every
hand-off: the jobs they carried come back through the lease rescue. PostgreSQL
is stopped 'fast' (sessions terminated) or 'immediate' (a crash: recovery on
start); the listener reconnects with backoff, the workers' pool replaces its
dead connections, and stage errors in between are retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from imagen.broker import GENERATE_QUEUE
from tests.reliability.harness import Harness
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

MOCK = {"backend": "mock", "size": "16x16"}


def test_redis_restart_losing_every_message_still_ends_every_job(harness: Callable[..., Harness]) -> None:
    # A slow provider (20 ms a call, 8 threads) keeps the queue behind the in-flight cap (64), so
    # messages are waiting in Redis, not only prefetched by the worker, when it goes: on a fast
    # machine with instant calls the worker had taken every message and the restart lost none.
    h = harness()
    h.start_workers(1, threads=8)
    listener = h.start_listener()
    ids = h.insert_backlog(400, {**MOCK, "delay_ms": 20})
    h.wait(lambda: h.counts()["done"] >= 60, 30, "backlog under way")
    queue = redis.Redis.from_url(h.redis_url)
    wait_until(
        lambda: queue.llen(f"dramatiq:{GENERATE_QUEUE}") >= 10,
        timeout=30,
        interval=0.002,
        message="messages waiting in Redis",
    )
    in_flight = [r[0] for r in h.query("SELECT id FROM imagen.jobs WHERE status = 'running'")]
    waiting = queue.llen(f"dramatiq:{GENERATE_QUEUE}")
    done_before = h.counts()["done"]
    h.servers.redis.stop()
    fault = time.monotonic()
    # Down until the workers' consumers have failed, so their reconnect path runs too (the line
    # imagen.logs.BrokerOutageFilter makes of Dramatiq's "Consumer encountered a connection error").
    h.wait(lambda: "redis unreachable" in h.all_log_text(), 15, "workers saw the outage")
    outage = time.monotonic() - fault
    h.servers.redis.start()
    h.wait(lambda: h.counts()["done"] > done_before + 20, 30, "progress after the restart")
    resumed = time.monotonic() - fault
    h.wait_terminal(in_flight, 60)
    h.figures.update(
        running_at_restart=len(in_flight), waiting_in_redis=waiting, outage_s=round(outage, 2), resumed_s=round(resumed, 1),
        recovery_s=round(time.monotonic() - fault, 1),
    )  # fmt: skip
    figures = h.finish(deadline=90)
    assert figures["jobs"] == len(ids)
    assert figures["rescued_jobs"] >= 1, "jobs whose messages died with Redis came back by lease rescue"
    assert listener.alive() and h.alive("workers"), "both processes survive a Redis restart"


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_mid_backlog_everything_completes(
    harness: Callable[..., Harness], mode: str
) -> None:
    h = harness()
    h.start_workers(1, threads=8)
    listener = h.start_listener()
    ids = h.insert_backlog(400, MOCK)
    h.wait(lambda: h.counts()["done"] >= 60, 30, "backlog under way")
    done_before = h.counts()["done"]
    in_flight = [r[0] for r in h.query("SELECT id FROM imagen.jobs WHERE status = 'running'")]
    h.servers.pg.stop(mode=mode)
    fault = time.monotonic()
    # Down until the listener has failed to reconnect a few times (backoff 0.05, 0.1, 0.2... s),
    # so its reconnect path runs and the workers' stages meet a dead database too.
    h.wait(
        lambda: listener.tail(50_000).count("lost its database connection") >= 5,
        15,
        "listener saw the outage",
    )
    outage = time.monotonic() - fault
    h.servers.pg.start()
    h.wait(lambda: h.listeners_connected() >= 1, 30, "listener reconnected")
    reconnect = time.monotonic() - fault
    h.wait(lambda: h.counts()["done"] > done_before + 20, 30, "progress after the restart")
    resumed = time.monotonic() - fault
    h.wait_terminal(in_flight, 60)
    h.figures.update(
        mode=mode, running_at_stop=len(in_flight), outage_s=round(outage, 2),
        listener_reconnect_s=round(reconnect, 1), resumed_s=round(resumed, 1),
        recovery_s=round(time.monotonic() - fault, 1),
    )  # fmt: skip
    figures = h.finish(deadline=90)
    assert figures["jobs"] == len(ids)
    assert listener.alive() and h.alive("workers"), "both processes survive a PostgreSQL restart"
    assert figures["usage_rows"] == figures["provider_calls"], "one usage row per provider call"
