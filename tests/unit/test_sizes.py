"""Per-model size rules: what each provider model can make, known before any call."""

from __future__ import annotations

import pytest

from imagen.backends.sizes import check_size, planned_size, size_rule
from imagen.errors import InvalidRequest
from imagen.params import spec_from_params


@pytest.mark.parametrize(
    ("backend", "model", "size", "aspect", "expected"),
    [
        ("openai", "gpt-image-2.5-flare", None, "16:9", (1280, 720)),
        ("openai", "gpt-image-2.5-flare", (3840, 2160), None, (3840, 2160)),
        ("openai", "gpt-image-1.5", None, "16:9", (1536, 1024)),
        ("openai", "gpt-image-2", None, None, (1024, 1024)),
        ("gemini", "gemini-2.5-flash-image", None, "16:9", (1365, 768)),
        ("gemini", "gemini-2.5-flash-image", (4000, 1000), None, (1564, 670)),
        ("mock", "mock-1", None, "16:9", (1024, 576)),
    ],
)
def test_planned_size_is_what_the_model_will_make(
    backend: str, model: str, size: tuple[int, int] | None, aspect: str | None, expected: tuple[int, int]
) -> None:
    assert planned_size(backend, model, size, aspect) == expected


def test_planned_size_refuses_what_the_model_cannot_make() -> None:
    with pytest.raises(InvalidRequest, match="cannot make 4096x4096"):
        planned_size("openai", "gpt-image-2.5-flare", (4096, 4096), None)


def test_unknown_openai_model_is_not_second_guessed() -> None:
    rule = size_rule("openai", "gpt-image-9")

    assert rule.kind == "any"
    check_size(rule, (1000, 700))


def test_gemini_3_1_models_take_the_extended_ratios_and_2_5_does_not() -> None:
    assert "1:8" in size_rule("gemini", "gemini-3.1-flash-lite-image").aspects
    assert "1:8" not in size_rule("gemini", "gemini-2.5-flash-image").aspects
    assert {"4:5", "5:4"} <= set(size_rule("gemini", "gemini-2.5-flash-image").aspects)


def test_job_params_take_a_quality_and_refuse_an_unknown_one() -> None:
    assert spec_from_params("a fox", {"quality": "low"}).quality == "low"
    with pytest.raises(InvalidRequest, match=r"params\.quality must be one of"):
        spec_from_params("a fox", {"quality": "ultra"})
