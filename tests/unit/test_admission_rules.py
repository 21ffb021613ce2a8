"""Admission without servers: the cap lists, when a job waits, and the throttle limit."""

from __future__ import annotations

import pytest

from imagen.admission import Deferred, ThrottleExhausted, deferral, is_throttle
from imagen.config import Settings, load_settings, parse_caps
from imagen.errors import ConfigError, InvalidRequest, QuotaExhausted, RateLimited, TransientError


def test_cap_lists_name_backends_and_models() -> None:
    caps = parse_caps("openai=4, google=8 ,openai/gpt-image-2=2")
    assert caps == {"openai": 4, "gemini": 8, "openai/gpt-image-2": 2}
    assert parse_caps("") == {}


@pytest.mark.parametrize("text", ["openai", "openai=0", "openai=x", "nope=2", "openai/=2"])
def test_a_bad_cap_list_stops_start_up_naming_the_variable(text: str) -> None:
    with pytest.raises(ConfigError, match="IMAGEN_BACKEND_CONCURRENCY"):
        load_settings(backend_concurrency=text)


def settings(**values: object) -> Settings:
    return Settings(**{"throttle_max_wait": 10, "lease_seconds": 600, **values})  # type: ignore[arg-type]


def test_429_and_advised_503_are_throttles_but_other_errors_are_not() -> None:
    assert is_throttle(RateLimited("429"))
    assert is_throttle(TransientError("503", retry_after=3))
    assert not is_throttle(TransientError("500"))
    assert not is_throttle(QuotaExhausted("insufficient_quota"))
    assert deferral(InvalidRequest("bad size"), 0.0, settings()) is None
    assert deferral(TransientError("500"), 0.0, settings()) is None


def test_waiting_for_our_own_cap_never_counts_towards_the_throttle_limit() -> None:
    wait = deferral(Deferred(1.5, "concurrency cap", provider_wait=False, waited_s=2.0), 9.9, settings())
    assert wait is not None and wait.throttled_s == 9.9 and not wait.is_provider
    assert wait.delay_s == 1.5


def test_provider_waits_add_up_and_fail_the_job_at_the_limit() -> None:
    limited = RateLimited("openai model m: rate limited (429 rate_limit_exceeded)")
    limited.admission_pause_s = 4.0
    first = deferral(limited, 0.0, settings())
    assert first is not None and first.is_provider and 4.0 <= first.delay_s <= 5.0
    last = deferral(limited, 8.0, settings())
    assert last is not None and last.delay_s <= 2.01, "the last wait ends at the limit"
    with pytest.raises(
        ThrottleExhausted, match=r"provider rate limit: waited 10 s .*429 rate_limit_exceeded"
    ):
        deferral(limited, 10.0, settings())


def test_no_wait_outlasts_a_quarter_of_the_lease() -> None:
    wait = deferral(Deferred(500, "provider pause", provider_wait=True), 0.0, settings(throttle_max_wait=900))
    assert wait is not None and wait.delay_s == 150
