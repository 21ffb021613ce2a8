"""The waking broker: an idle consumer gets a new message at once, with Dramatiq's semantics intact."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker

from imagen.broker import MAX_WAKE_TOKENS, WakingRedisBroker
from tests.waiting import wait_until

# Wake-up latency under 0.25 s: run alone, outside the parallel pool (pyproject: serial).
pytestmark = pytest.mark.serial


def blocked_pops(broker: RedisBroker) -> int:
    """Clients Redis holds in a blocking command (the waking consumer's BLPOP), from CLIENT LIST."""
    return sum(1 for client in broker.client.client_list() if "b" in client["flags"])


def fetches(broker: RedisBroker) -> int:
    """Calls of Dramatiq's fetch script so far (EVALSHA in INFO commandstats)."""
    stats = broker.client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def consume_one(
    broker: RedisBroker, queue: str, timeout_ms: int, idle: Callable[[], object]
) -> tuple[Any, float]:
    """Start a consumer, enqueue once `idle()` says it waits for work, return (message, seconds to receive)."""
    consumer = broker.consume(queue, prefetch=1, timeout=timeout_ms)
    received: list[Any] = []

    def run() -> None:
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            message = next(consumer)
            if message is not None:
                received.append((message, time.monotonic()))

    thread = threading.Thread(target=run)
    thread.start()
    # The point is that the consumer already waits when the message comes: wait for that, not a guess.
    wait_until(idle, timeout=10, message="the consumer waiting for work")
    sent = time.monotonic()
    broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="noop", args=(), kwargs={}, options={}))
    thread.join(10)
    consumer.ack(received[0][0])
    consumer.close()
    return received[0][0], received[0][1] - sent


def test_idle_consumer_wakes_on_enqueue_instead_of_sleeping_its_timeout(redis_url: str) -> None:
    broker = WakingRedisBroker(url=redis_url)
    broker.declare_queue("wake-test")
    message, latency = consume_one(broker, "wake-test", timeout_ms=5000, idle=lambda: blocked_pops(broker))
    assert message.queue_name == "wake-test"
    assert latency < 0.25, f"took {latency:.3f}s: the consumer slept instead of waking"


def test_stock_broker_baseline_sleeps_up_to_its_timeout(redis_url: str) -> None:
    """The baseline we replace: Dramatiq's consumer sleeps with backoff between empty fetches."""
    broker = RedisBroker(url=redis_url)
    broker.declare_queue("stock-test")
    first = fetches(broker)
    last = [first]

    def just_fetched_in_long_backoff() -> bool:
        # Ten empty fetches put its backoff at the 2 s timeout (sleeps of 1-2 s with jitter); the
        # message goes right after the next fetch, so it comes during one of those sleeps.
        now = fetches(broker)
        fetched, last[0] = now > last[0], now
        return fetched and now >= first + 11

    _, latency = consume_one(broker, "stock-test", timeout_ms=2000, idle=just_fetched_in_long_backoff)
    assert latency > 0.5


def test_wake_tokens_are_bounded_when_nobody_consumes(redis_url: str) -> None:
    broker = WakingRedisBroker(url=redis_url)
    broker.declare_queue("pile")
    for _ in range(MAX_WAKE_TOKENS * 3):
        broker.enqueue(dramatiq.Message(queue_name="pile", actor_name="noop", args=(), kwargs={}, options={}))
    assert broker.client.llen(broker.wake_key("pile")) == MAX_WAKE_TOKENS
    assert 0 < broker.client.ttl(broker.wake_key("pile")) <= 3600


@pytest.mark.parametrize("delay_ms", [200])
def test_delayed_messages_still_arrive_after_their_delay(redis_url: str, delay_ms: int) -> None:
    broker = WakingRedisBroker(url=redis_url)
    done = threading.Event()

    @dramatiq.actor(broker=broker, queue_name="delayed", actor_name="delayed_noop")
    def delayed_noop() -> None:
        done.set()

    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=1000)
    worker.start()
    try:
        sent = time.monotonic()
        delayed_noop.send_with_options(delay=delay_ms)
        wait_until(done.is_set, timeout=10, message="delayed message processed")
        assert time.monotonic() - sent >= delay_ms / 1000
    finally:
        worker.stop()


def test_enqueue_many_delivers_every_message_once_with_bounded_wake_tokens(redis_url: str) -> None:
    broker = WakingRedisBroker(url=redis_url)
    seen: list[int] = []
    lock = threading.Lock()

    @dramatiq.actor(broker=broker, queue_name="batch", actor_name="batch_noop")
    def batch_noop(i: int) -> None:
        with lock:
            seen.append(i)

    n = MAX_WAKE_TOKENS * 2
    messages = [batch_noop.message(i) for i in range(n)]
    sent = broker.enqueue_many(messages)
    assert len({m.options["redis_message_id"] for m in sent}) == n
    assert broker.client.llen(broker.wake_key("batch")) == MAX_WAKE_TOKENS
    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=100)
    worker.start()
    try:
        wait_until(lambda: len(seen) >= n, timeout=20, message=f"{len(seen)} of {n} batch messages processed")
        worker.join()
    finally:
        worker.stop()
    assert sorted(seen) == list(range(n)), "each message exactly once"
    with pytest.raises(ValueError, match="one queue"):
        other = dramatiq.Message(queue_name="elsewhere", actor_name="noop", args=(), kwargs={}, options={})
        broker.enqueue_many([messages[0], other])
