"""The waking broker: an idle consumer gets a new message at once, with Dramatiq's semantics intact."""

from __future__ import annotations

import threading
import time
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker

from imagen.broker import MAX_WAKE_TOKENS, WakingRedisBroker
from tests.waiting import wait_until

# Wake-up latency under 0.25 s: run alone, outside the parallel pool (pyproject: serial).
pytestmark = pytest.mark.serial


def consume_one(broker: RedisBroker, queue: str, timeout_ms: int) -> tuple[Any, float]:
    """Start an idle consumer, enqueue after it is blocked, return (message, seconds to receive)."""
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
    time.sleep(0.3)  # let the consumer go idle: the point is that it is blocked when the message comes
    sent = time.monotonic()
    broker.enqueue(dramatiq.Message(queue_name=queue, actor_name="noop", args=(), kwargs={}, options={}))
    thread.join(10)
    consumer.ack(received[0][0])
    consumer.close()
    return received[0][0], received[0][1] - sent


def test_idle_consumer_wakes_on_enqueue_instead_of_sleeping_its_timeout(redis_url: str) -> None:
    broker = WakingRedisBroker(url=redis_url)
    broker.declare_queue("wake-test")
    message, latency = consume_one(broker, "wake-test", timeout_ms=5000)
    assert message.queue_name == "wake-test"
    assert latency < 0.25, f"took {latency:.3f}s: the consumer slept instead of waking"


def test_stock_broker_baseline_sleeps_up_to_its_timeout(redis_url: str) -> None:
    """The baseline we replace: Dramatiq's consumer sleeps with backoff between empty fetches."""
    broker = RedisBroker(url=redis_url)
    broker.declare_queue("stock-test")
    _, latency = consume_one(broker, "stock-test", timeout_ms=2000)
    assert latency > 0.05


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
