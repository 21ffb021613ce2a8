"""build_broker: the stage middleware carries the operator's settings from construction."""

from __future__ import annotations

from dramatiq.middleware import Retries, TimeLimit

from imagen.broker import build_broker
from imagen.config import load_settings


def test_build_broker_gives_retries_and_time_limit_the_configured_values() -> None:
    settings = load_settings(
        redis_url="redis://127.0.0.1:1/0",
        stage_retries=7,
        retry_min_backoff_ms=250,
        retry_max_backoff_ms=9000,
        generate_time_limit=42.5,
        provider_timeout=30,  # must be below the time limit
    )

    broker = build_broker(settings)

    retries = next(m for m in broker.middleware if isinstance(m, Retries))
    limit = next(m for m in broker.middleware if isinstance(m, TimeLimit))
    assert (retries.max_retries, retries.min_backoff, retries.max_backoff) == (7, 250, 9000)
    assert limit.time_limit == 42_500
