"""The price table is data with a source and a date, and turns reference usage blocks into dollars."""

from __future__ import annotations

import tomllib
from datetime import date
from importlib import resources
from typing import Any

import pytest

from imagen.backends.base import Usage
from imagen.errors import ConfigError
from imagen.prices import (
    RATE_FIELDS,
    SOURCE_QUALITIES,
    estimate_cost,
    load_prices,
    parse_prices,
    price_for,
    price_usage,
)

# Usage blocks as the providers send them (shared/reference/providers.md §1.3 and §2.2).
GEMINI_USAGE_METADATA = {
    "promptTokenCount": 9,
    "candidatesTokenCount": 1295,
    "totalTokenCount": 1304,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}],
    "candidatesTokensDetails": [
        {"modality": "IMAGE", "tokenCount": 1290},
        {"modality": "TEXT", "tokenCount": 5},
    ],
}
OPENAI_USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
    "output_tokens": 196,
    "output_tokens_details": {"image_tokens": 196, "text_tokens": 0},
    "total_tokens": 208,
}


def gemini_usage(model: str, metadata: dict[str, Any], *, thoughts: int | None = None) -> Usage:
    image_tokens = sum(
        d["tokenCount"] for d in metadata["candidatesTokensDetails"] if d["modality"] == "IMAGE"
    )
    return Usage(
        backend="gemini",
        model=model,
        images=1,
        input_tokens=metadata["promptTokenCount"],
        output_tokens=metadata["candidatesTokenCount"],
        image_output_tokens=image_tokens,
        thought_tokens=thoughts,
        raw={"calls": [metadata]},
    )


def openai_usage(model: str, block: dict[str, Any]) -> Usage:
    return Usage(
        backend="openai",
        model=model,
        images=1,
        input_tokens=block["input_tokens"],
        output_tokens=block["output_tokens"],
        image_output_tokens=block["output_tokens_details"]["image_tokens"],
        raw={"calls": [block]},
    )


def test_every_packaged_entry_has_a_source_an_as_of_date_and_a_rate() -> None:
    prices = load_prices()
    assert prices
    for price in prices.values():
        assert price.source.strip()
        assert isinstance(price.as_of, date)
        assert any(getattr(price, name) is not None for name in RATE_FIELDS)


def test_packaged_toml_states_source_and_as_of_for_each_model_itself() -> None:
    text = resources.files("imagen").joinpath("data", "prices.toml").read_text(encoding="utf-8")
    for model, entry in tomllib.loads(text)["models"].items():
        assert {"source", "as_of"} <= entry.keys(), model


def test_default_models_of_both_backends_are_priced() -> None:
    assert price_for("gemini-2.5-flash-image") is not None
    assert price_for("gpt-image-2.5-flare") is not None


def test_gemini_flash_image_reference_usage_costs_about_four_cents() -> None:
    cost = estimate_cost(gemini_usage("gemini-2.5-flash-image", GEMINI_USAGE_METADATA))

    assert cost == pytest.approx((9 * 0.30 + 1290 * 30.0) / 1e6)
    assert cost == pytest.approx(0.039, abs=0.001)


def test_gemini_pro_prices_thoughts_and_text_output_at_text_rate_and_image_tokens_at_image_rate() -> None:
    cost = estimate_cost(gemini_usage("gemini-3-pro-image", GEMINI_USAGE_METADATA, thoughts=200))

    expected = (9 * 2.0 + 1290 * 120.0 + (5 + 200) * 12.0) / 1e6
    assert cost == pytest.approx(expected)


def test_preview_alias_uses_the_same_price_as_its_model() -> None:
    usage = gemini_usage("gemini-3.1-flash-image-preview", GEMINI_USAGE_METADATA)

    assert estimate_cost(usage) == pytest.approx((9 * 0.50 + 1290 * 60.0 + 5 * 1.50) / 1e6)


def test_openai_reference_usage_prices_text_in_and_image_out() -> None:
    cost = estimate_cost(openai_usage("gpt-image-2", OPENAI_USAGE))

    assert cost == pytest.approx((12 * 5.0 + 196 * 30.0) / 1e6)


def test_openai_image_input_tokens_are_priced_at_the_image_input_rate() -> None:
    block = {
        "input_tokens": 1012,
        "input_tokens_details": {"text_tokens": 12, "image_tokens": 1000},
        "output_tokens": 196,
        "output_tokens_details": {"image_tokens": 196, "text_tokens": 0},
        "total_tokens": 1208,
    }
    cost = estimate_cost(openai_usage("gpt-image-2-2026-04-21", block))

    assert cost == pytest.approx((12 * 5.0 + 1000 * 8.0 + 196 * 30.0) / 1e6)


def test_per_image_model_costs_its_price_times_images() -> None:
    usage = Usage(backend="gemini", model="imagen-4.0-generate-001", images=3)

    assert estimate_cost(usage) == pytest.approx(0.12)


def test_unknown_model_has_no_estimate() -> None:
    assert estimate_cost(openai_usage("dall-e-9", OPENAI_USAGE)) is None


def test_mock_costs_nothing() -> None:
    assert estimate_cost(Usage(backend="mock", model="mock-1", images=4)) == 0.0


def test_failed_call_without_tokens_costs_nothing_but_images_without_tokens_are_unknown() -> None:
    refused = Usage(backend="openai", model="gpt-image-2", ok=False, error="429")
    untold = Usage(backend="openai", model="gpt-image-2", images=1)

    assert estimate_cost(refused) == 0.0
    assert estimate_cost(untold) is None


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"text_in": 1.0, "as_of": date(2026, 1, 1)}, "source"),
        ({"text_in": 1.0, "source": "x"}, "as_of"),
        ({"source": "x", "as_of": date(2026, 1, 1)}, "no rate"),
        ({"text_in": -1.0, "source": "x", "as_of": date(2026, 1, 1)}, "non-negative"),
        ({"txt_in": 1.0, "source": "x", "as_of": date(2026, 1, 1)}, "unknown keys"),
        ({"text_in": 1.0, "source": "x", "as_of": date(2026, 1, 1)}, "quality"),
        ({"text_in": 1.0, "source": "x", "as_of": date(2026, 1, 1), "quality": "rumour"}, "quality"),
    ],
)
def test_malformed_entries_are_config_errors_naming_the_problem(entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_prices({"models": {"m": entry}})


def test_an_alias_that_repeats_a_model_is_rejected() -> None:
    entry = {"per_image": 0.01, "source": "x", "as_of": date(2026, 1, 1), "quality": "vendor"}
    with pytest.raises(ConfigError, match="priced twice"):
        parse_prices({"models": {"a": entry, "b": {**entry, "aliases": ["a"]}}})


def test_every_packaged_entry_states_its_source_quality() -> None:
    text = resources.files("imagen").joinpath("data", "prices.toml").read_text(encoding="utf-8")
    for model, entry in tomllib.loads(text)["models"].items():
        assert entry.get("quality") in SOURCE_QUALITIES, model


@pytest.mark.parametrize(
    "model", ["gpt-image-1.5", "chatgpt-image-latest", "gemini-3.1-flash-lite-image", "gpt-image-2.6-flare"]
)
def test_current_models_named_by_the_sdks_are_priced(model: str) -> None:
    assert price_for(model) is not None


def test_gpt_image_2_text_output_tokens_are_not_free() -> None:
    block = {
        **OPENAI_USAGE,
        "output_tokens": 296,
        "output_tokens_details": {"image_tokens": 196, "text_tokens": 100},
    }
    usage = openai_usage("gpt-image-2.5-flare", block)

    assert estimate_cost(usage) == pytest.approx((12 * 5.0 + 196 * 30.0 + 100 * 10.0) / 1e6)


def test_flash_lite_image_costs_about_three_cents_an_image() -> None:
    metadata = {
        **GEMINI_USAGE_METADATA,
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1120}],
    }
    metadata["candidatesTokenCount"] = 1120
    cost = estimate_cost(gemini_usage("gemini-3.1-flash-lite-image", metadata))

    assert cost == pytest.approx(0.0336, abs=0.0005)


def test_basis_names_the_price_entry_its_date_and_source_quality() -> None:
    estimate = price_usage(openai_usage("gpt-image-2-2026-04-21", OPENAI_USAGE))

    assert "gpt-image-2 as of 2026-11-30 (secondary source)" in estimate.basis


def test_unknown_model_is_unpriced_and_the_basis_says_which_model() -> None:
    estimate = price_usage(openai_usage("gpt-image-9", OPENAI_USAGE))

    assert estimate.usd is None
    assert estimate.basis.startswith("unpriced:")
    assert "gpt-image-9" in estimate.basis


def test_images_without_image_output_tokens_are_unpriced_not_almost_free() -> None:
    usage = Usage(backend="gemini", model="gemini-2.5-flash-image", images=1, input_tokens=9)
    estimate = price_usage(usage)

    assert estimate.usd is None
    assert "no image-output tokens" in estimate.basis


def test_text_tokens_without_a_published_rate_are_named_in_the_basis() -> None:
    estimate = price_usage(gemini_usage("gemini-2.5-flash-image", GEMINI_USAGE_METADATA))

    assert "5 text-output tokens have no published rate" in estimate.basis
