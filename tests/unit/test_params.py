"""spec_from_params: the gate between a job's arbitrary params JSON and the pipeline."""

from __future__ import annotations

from typing import Any

import pytest

from imagen.errors import InvalidRequest, PermanentError
from imagen.params import KNOWN, MAX_SEED, GenerateSpec, spec_from_params

PROMPT = "a lighthouse at dusk"


def rejected(params: Any, prompt: str = PROMPT) -> str:
    """The message of the InvalidRequest `params` is refused with."""
    with pytest.raises(InvalidRequest) as caught:
        spec_from_params(prompt, params)
    assert isinstance(caught.value, PermanentError)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_every_documented_key_is_accepted_with_its_type() -> None:
    spec = spec_from_params(
        PROMPT,
        {
            "backend": "mock",
            "model": "mock-1",
            "size": "320x200",
            "preset": "cinematic",
            "seed": 42,
            "negative_prompt": "blurry",
            "delay_ms": 250,
            "fail": "transient",
        },
    )

    assert spec == GenerateSpec(
        prompt=PROMPT,
        backend="mock",
        model="mock-1",
        size=(320, 200),
        aspect_ratio=None,
        preset="cinematic",
        seed=42,
        negative_prompt="blurry",
        options={"delay_ms": 250, "fail": "transient"},
    )


def test_aspect_ratio_is_accepted_instead_of_size() -> None:
    spec = spec_from_params(PROMPT, {"aspect_ratio": "16:9"})

    assert spec.aspect_ratio == "16:9"
    assert spec.size is None


def test_empty_params_give_a_spec_with_only_the_prompt() -> None:
    assert spec_from_params(f"  {PROMPT}  ", {}) == GenerateSpec(prompt=PROMPT)


def test_backend_alias_is_canonical() -> None:
    assert spec_from_params(PROMPT, {"backend": "Google"}).backend == "gemini"


@pytest.mark.parametrize("fail", ["transient", "permanent"])
def test_fail_accepts_transient_and_permanent(fail: str) -> None:
    assert spec_from_params(PROMPT, {"fail": fail}).options == {"fail": fail}


def test_integral_float_seed_is_accepted_as_an_int() -> None:
    spec = spec_from_params(PROMPT, {"seed": 42.0})

    assert spec.seed == 42
    assert type(spec.seed) is int


def test_seed_bounds_are_inclusive() -> None:
    assert spec_from_params(PROMPT, {"seed": 0}).seed == 0
    assert spec_from_params(PROMPT, {"seed": MAX_SEED}).seed == MAX_SEED


def test_unknown_key_is_refused_with_the_list_of_allowed_keys() -> None:
    message = rejected({"seed": 1, "colour": "red"})

    assert "colour" in message
    for key in KNOWN:
        assert key in message


@pytest.mark.parametrize("seed", ["42", 4.5, True, False, -1, MAX_SEED + 1, 2**64, [1], {"v": 1}], ids=repr)
def test_ill_typed_or_out_of_range_seed_is_refused(seed: Any) -> None:
    assert "params.seed" in rejected({"seed": seed})


@pytest.mark.parametrize(
    "size", ["banana", "320", "320x", "x200", "-5x10", "12x12", "5000x100", "100x0", 320]
)
def test_malformed_or_out_of_range_size_is_refused(size: Any) -> None:
    assert "size" in rejected({"size": size})


def test_size_and_aspect_ratio_together_are_refused() -> None:
    message = rejected({"size": "320x200", "aspect_ratio": "16:9"})

    assert "size" in message
    assert "aspect_ratio" in message


@pytest.mark.parametrize("aspect", ["16x9", "wide", "0:1", "16:0", "9:1", "1:9", "16/9", 1.77])
def test_bad_aspect_ratio_is_refused(aspect: Any) -> None:
    assert "aspect_ratio" in rejected({"aspect_ratio": aspect})


@pytest.mark.parametrize("fail", ["sometimes", "TRANSIENT", 1, True, ""])
def test_fail_outside_transient_and_permanent_is_refused(fail: Any) -> None:
    assert "params.fail" in rejected({"fail": fail})


@pytest.mark.parametrize("delay", [-1, 600_001, "100", 1.5, True])
def test_bad_delay_ms_is_refused(delay: Any) -> None:
    assert "params.delay_ms" in rejected({"delay_ms": delay})


@pytest.mark.parametrize("key,value", [("delay_ms", 100), ("fail", "transient")])
@pytest.mark.parametrize("backend", ["openai", "gemini", "google"])
def test_mock_only_keys_with_another_backend_are_refused(key: str, value: Any, backend: str) -> None:
    message = rejected({"backend": backend, key: value})

    assert key in message
    assert "mock" in message


def test_unknown_backend_is_refused_with_the_known_backends() -> None:
    message = rejected({"backend": "dall-e-1"})

    assert "dall-e-1" in message
    assert "mock" in message


@pytest.mark.parametrize("params", [["seed", 1], "seed=1", None, 42, True], ids=repr)
def test_params_that_are_not_an_object_are_refused(params: Any) -> None:
    assert "JSON object" in rejected(params)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t", None, 42], ids=repr)
def test_blank_or_missing_prompt_is_refused(prompt: Any) -> None:
    assert "prompt" in rejected({}, prompt=prompt)


@pytest.mark.parametrize("key", ["backend", "model", "preset", "negative_prompt"])
@pytest.mark.parametrize("value", [1, ["x"], {"x": 1}, "", "   "], ids=repr)
def test_string_keys_refuse_other_types_and_blank_text(key: str, value: Any) -> None:
    assert f"params.{key}" in rejected({key: value})


def test_overlong_negative_prompt_is_refused() -> None:
    assert "too long" in rejected({"negative_prompt": "x" * 2001})


def test_text_params_never_reach_the_spec_untrimmed() -> None:
    spec = spec_from_params(PROMPT, {"model": "  mock-1 ", "preset": " photo", "negative_prompt": "blur  "})

    assert (spec.model, spec.preset, spec.negative_prompt) == ("mock-1", "photo", "blur")
