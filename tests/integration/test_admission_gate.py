"""The admission gate on a real Redis, two gates standing for two worker processes."""

from __future__ import annotations

import time
from contextlib import ExitStack

import pytest
import redis

from imagen.admission import Deferred, Gate
from imagen.config import Settings

pytestmark = pytest.mark.integration


def gate(redis_url: str, **caps: str) -> Gate:
    return Gate(Settings(redis_url=redis_url, **caps), redis.Redis.from_url(redis_url))  # type: ignore[arg-type]


def test_the_rate_cap_is_shared_and_refuses_the_call_past_it(redis_url: str) -> None:
    first, second = gate(redis_url, backend_rpm="openai=3"), gate(redis_url, backend_rpm="openai=3")
    for g in (first, second, first):
        with g.admitted("openai", "gpt-image-2"):
            pass
    started = time.monotonic()
    with pytest.raises(Deferred, match="rpm cap") as refused, second.admitted("openai", "gpt-image-2"):
        pass
    assert not refused.value.provider_wait
    assert time.monotonic() - started < 5, "the call gave its thread back after holding it briefly"
    with gate(redis_url, backend_rpm="gemini=3").admitted("gemini", "gemini-2.5-flash-image"):
        pass  # another backend's window is its own


def test_a_model_cap_applies_next_to_its_backend_cap(redis_url: str) -> None:
    caps = {"backend_concurrency": "openai=3,openai/gpt-image-2=1"}
    a, b = gate(redis_url, **caps), gate(redis_url, **caps)
    with ExitStack() as held:
        held.enter_context(a.admitted("openai", "gpt-image-2"))
        with pytest.raises(Deferred, match="concurrency cap"), b.admitted("openai", "gpt-image-2"):
            pass
        held.enter_context(b.admitted("openai", "gpt-image-1"))
        held.enter_context(a.admitted("openai", "gpt-image-1"))
        with pytest.raises(Deferred, match="concurrency cap"), b.admitted("openai", "gpt-image-1"):
            pass  # the backend's 3 are taken
    with a.admitted("openai", "gpt-image-2"):
        pass  # released on the way out


def test_a_provider_pause_holds_every_gate_for_the_advised_time(redis_url: str) -> None:
    a, b = gate(redis_url), gate(redis_url)
    a.pause("openai", "gpt-image-2", 30)
    with pytest.raises(Deferred, match="provider pause") as paused, b.admitted("openai", "gpt-image-2"):
        pass
    assert paused.value.provider_wait and 25 < paused.value.delay_s <= 30
    assert b.pause_left("openai", "gpt-image-1") == 0, "another model goes on"
    a.pause("gemini", "m", 10_000)
    assert b.pause_left("gemini", "m") <= 900, "no pause outlasts IMAGEN_THROTTLE_MAX_WAIT"
