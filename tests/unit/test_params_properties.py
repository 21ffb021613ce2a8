"""Properties of the params gate over arbitrary JSON: a job's input either validates or is refused readably.

`params` is whatever JSON object a user wrote through PostgREST, and `prompt` any
text; spec_from_params and resolve_spec are all that stand between them and a
backend. Whatever they are given, they return a spec or raise InvalidRequest
with a one-line message an owner can read: never another exception, which the
stage would take for a transient failure and retry.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imagen.config import Settings
from imagen.errors import InvalidRequest
from imagen.params import (
    KNOWN,
    MAX_DELAY_MS,
    MAX_NEGATIVE,
    MAX_SEED,
    QUALITIES,
    GenerateSpec,
    spec_from_params,
)
from imagen.pipeline import resolve_spec
from imagen.presets import load_presets

PRESETS = load_presets()
SETTINGS = Settings(_env_file=None, database_url=None, backend="mock")
MAX_MESSAGE = 1000

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=50)
    | st.sampled_from(
        [
            "mock", "openai", "gemini", "google", " MOCK ", "", "   ", "512x512", "16:9", "0:0", "9x9",
            "4096x4097", "cinematic", "transient", "permanent", "../../etc/passwd", "'; drop table imagen.jobs; --",
            "1e400", "NaN", "\u202eevil", "🦙" * 30,
        ]
    )
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
keys = st.sampled_from(KNOWN) | st.text(max_size=30)
params_objects = st.dictionaries(keys, json_values, max_size=6)
prompts = st.text(max_size=300) | st.sampled_from(
    ["a cat", " \t\n", "\x1c", "../../../../etc/passwd", "x" * 4000]
)


def _outcome(prompt: Any, params: Any) -> GenerateSpec | InvalidRequest:
    """The spec after resolve_spec, or the InvalidRequest; any other exception escapes."""
    try:
        spec = spec_from_params(prompt, params)
        resolved, _preset = resolve_spec(spec, SETTINGS, PRESETS)
    except InvalidRequest as exc:
        return exc
    return resolved


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=prompts | json_values, params=params_objects | json_values)
@example(prompt="a cat", params={"seed": 2**31})
@example(prompt="a cat", params={"seed": 1e308, "delay_ms": -1e308})
@example(prompt="a cat", params={"seed": math.inf})
@example(prompt="a cat", params={"size": "99999x99999"})
@example(prompt="a cat", params={"aspect_ratio": "1:0"})
@example(prompt="a cat", params={"backend": "openai", "delay_ms": 5})
@example(prompt="a cat", params={"preset": "nope", "size": "32x32"})
@example(prompt=["not", "text"], params={})
@example(prompt="a cat", params=[["a", 1]])
def test_params_give_a_spec_or_invalid_request(prompt: Any, params: Any) -> None:
    outcome = _outcome(prompt, params)
    if isinstance(outcome, InvalidRequest):
        assert str(outcome).strip() and "Traceback" not in str(outcome)
    else:
        assert outcome.backend in ("mock", "openai", "gemini")
        assert outcome.prompt.strip()


def _near(low: int, high: int) -> st.SearchStrategy[int]:
    """Integers in [low, high], often at a bound or one past it."""
    edges = [low - 1, low, low + 1, high - 1, high, high + 1]
    return st.sampled_from(edges) | st.integers(min_value=low, max_value=high)


sides = _near(16, 4096)
# Mostly valid params (a few a step past a bound): so the bounds below are checked on hundreds of
# specs, not the handful that arbitrary JSON happens to make valid.
plausible_params = st.fixed_dictionaries(
    {},
    optional={
        "backend": st.sampled_from(["mock", " mock ", "MOCK"]),
        "size": st.builds(lambda w, h: f"{w}x{h}", sides, sides),
        "seed": _near(0, MAX_SEED)
        | st.floats(min_value=0, max_value=MAX_SEED).map(float.__floor__).map(float),
        "delay_ms": _near(0, MAX_DELAY_MS),
        "fail": st.sampled_from(["transient", "permanent"]),
        "quality": st.sampled_from(QUALITIES),
        "model": st.sampled_from(["mock-1", "any-model"]),
        "negative_prompt": st.sampled_from(["blurry", "x" * MAX_NEGATIVE]),
    },
)


def test_a_valid_spec_keeps_only_known_keys_in_bounds() -> None:
    outcomes: Counter[str] = Counter()

    @settings(max_examples=200, deadline=None, database=None)
    @given(params=plausible_params)
    def check(params: dict[str, Any]) -> None:
        outcome = _outcome("a cat", params)
        if isinstance(outcome, InvalidRequest):
            outcomes["invalid"] += 1
            return
        outcomes["valid"] += 1
        assert set(params) <= set(KNOWN)
        if outcome.size is not None:
            assert all(16 <= side <= 4096 for side in outcome.size)
            outcomes["at a size bound"] += any(side in (16, 4096) for side in outcome.size)
        if outcome.seed is not None:
            assert 0 <= outcome.seed <= MAX_SEED
            outcomes["at a seed bound"] += outcome.seed in (0, MAX_SEED)
        assert set(outcome.options) <= {"delay_ms", "fail"}
        if "delay_ms" in outcome.options:
            assert 0 <= outcome.options["delay_ms"] <= MAX_DELAY_MS

    check()

    # The property held on many valid specs, some at each bound, and the strategy still made
    # invalid ones (a step past a bound): a strategy that drifts to all-invalid fails here.
    assert outcomes["valid"] >= 100 and outcomes["invalid"] >= 10, outcomes
    assert outcomes["at a size bound"] >= 5 and outcomes["at a seed bound"] >= 5, outcomes


@pytest.mark.parametrize("params", [{"seed": 10**5000}, {"delay_ms": -(10**5000)}, {"fail": [10**5000]}])
def test_a_huge_integer_is_refused_with_invalid_request(params: dict[str, Any]) -> None:
    assert isinstance(_outcome("a cat", params), InvalidRequest)


@given(
    params=st.one_of(
        st.dictionaries(st.text(min_size=200, max_size=400), st.none(), min_size=10, max_size=12),
        st.builds(lambda text: {"fail": text}, st.text(min_size=2000, max_size=3000)),
        st.builds(lambda key: {f"a\n{key}": 1}, st.text(max_size=20)),
    )
)
@example(params={f"key-{i}-" + "k" * 300: 1 for i in range(10)})
@example(params={"size\nTraceback (most recent call last):": 1})
@settings(max_examples=30, deadline=None)
def test_error_text_stays_one_short_line_whatever_the_input(params: dict[str, Any]) -> None:
    outcome = _outcome("a cat", params)
    assert isinstance(outcome, InvalidRequest)
    message = str(outcome)
    assert len(message) < MAX_MESSAGE and "\n" not in message
