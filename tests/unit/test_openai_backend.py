"""Contract tests for the OpenAI backend against a loopback server speaking the Images API wire format."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from imagen.backends.base import ImageRequest, Usage
from imagen.backends.openai import OpenAIBackend
from imagen.config import Settings
from imagen.errors import (
    AuthError,
    ContentBlocked,
    InvalidRequest,
    NoImage,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
    TransientError,
)
from imagen.prices import estimate_cost
from tests.fake_providers import FakeProvider, ScriptedResponse, fake_provider, isolate_provider_env, png_b64

KEY = "sk-test-SECRET-0123456789abcdefghij"
MODEL = "gpt-image-2.5-flare"
USAGE = {
    "input_tokens": 12,
    "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
    "output_tokens": 196,
    "output_tokens_details": {"image_tokens": 196, "text_tokens": 0},
    "total_tokens": 208,
}


def images_response(count: int = 1, *, width: int = 64, height: int = 48) -> dict[str, Any]:
    return {
        "created": 1764000000,
        "background": "opaque",
        "output_format": "png",
        "quality": "low",
        "size": "1024x1024",
        "data": [{"b64_json": png_b64(width, height)} for _ in range(count)],
        "usage": USAGE,
    }


def api_error(
    status: int,
    code: str | None,
    message: str,
    *,
    kind: str = "invalid_request_error",
    headers: dict[str, str] | None = None,
) -> ScriptedResponse:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return ScriptedResponse(status, body, headers=headers or {})


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_provider_env(monkeypatch)


@pytest.fixture
def server() -> Iterator[FakeProvider]:
    with fake_provider() as provider:
        yield provider


def make_backend(server: FakeProvider, **overrides: Any) -> OpenAIBackend:
    fields: dict[str, Any] = {"openai_api_key": KEY, "openai_base_url": f"{server.url}/v1"}
    fields.update(overrides)
    return OpenAIBackend(Settings(_env_file=None, **fields))


def usage_of(error: Exception) -> Usage:
    """The usage a failed call carries for the ledger."""
    usage = getattr(error, "usage", None)
    assert isinstance(usage, Usage)
    return usage


def fail(backend: OpenAIBackend, request: ImageRequest | None = None) -> Any:
    with pytest.raises(Exception) as caught:
        backend.generate(request or ImageRequest(prompt="a red fox"))
    return caught.value


def test_generate_posts_model_prompt_n_size_and_png_with_bearer_key(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=images_response(2), headers={"x-request-id": "req_123"}))
    result = make_backend(server).generate(ImageRequest(prompt="a red fox", n=2, size=(1536, 1024)))

    assert len(server.requests) == 1
    sent = server.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/images/generations")
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["x-stainless-retry-count"] == "0"
    assert sent.body == {
        "model": MODEL,
        "prompt": "a red fox",
        "n": 2,
        "size": "1536x1024",
        "quality": "auto",
        "output_format": "png",
    }
    assert [(img.width, img.height, img.mime, img.index, img.seed) for img in result.images] == [
        (64, 48, "image/png", 0, None),
        (64, 48, "image/png", 1, None),
    ]
    assert result.images[0].data.startswith(b"\x89PNG")
    assert result.model == MODEL
    assert result.warnings == []
    assert result.usage.raw["request_ids"] == ["req_123"]


def test_usage_comes_from_the_response_and_prices_image_tokens_at_image_rate(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=images_response()))
    usage = make_backend(server).generate(ImageRequest(prompt="a red fox")).usage

    assert (usage.backend, usage.model, usage.images, usage.ok) == ("openai", MODEL, 1, True)
    assert (usage.input_tokens, usage.output_tokens, usage.image_output_tokens) == (12, 196, 196)
    assert usage.raw["calls"] == [USAGE]
    assert estimate_cost(usage) == pytest.approx((12 * 5.0 + 196 * 30.0) / 1e6)


@pytest.mark.parametrize(
    ("model", "aspect", "size", "warned"),
    [
        (MODEL, "1:1", "1024x1024", False),
        (MODEL, "3:2", "1536x1024", False),
        (MODEL, "16:9", "1280x720", False),
        (MODEL, "9:16", "720x1280", False),
        (MODEL, "21:9", "1568x672", False),
        ("gpt-image-2", "4:5", "896x1120", False),
        ("gpt-image-1.5", "16:9", "1536x1024", True),
        ("gpt-image-1-mini", "9:16", "1024x1536", True),
        ("chatgpt-image-latest", "1:1", "1024x1024", False),
    ],
)
def test_aspect_ratio_is_exact_on_models_with_free_sizes_and_nearest_standard_size_on_the_others(
    server: FakeProvider, model: str, aspect: str, size: str, warned: bool
) -> None:
    server.reply(ScriptedResponse(body=images_response()))
    result = make_backend(server).generate(ImageRequest(prompt="a red fox", aspect_ratio=aspect, model=model))

    assert server.requests[0].body["size"] == size
    width, height = map(int, size.split("x"))
    assert width % 16 == 0 and height % 16 == 0
    assert any(aspect in w for w in result.warnings) is warned


def test_seed_and_negative_prompt_are_warnings_and_never_sent(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=images_response()))
    result = make_backend(server).generate(
        ImageRequest(prompt="a red fox", seed=42, negative_prompt="blurry")
    )

    body = server.requests[0].body
    assert "seed" not in body
    assert "blurry" not in str(body)
    assert any("seed" in w for w in result.warnings)
    assert any("negative" in w for w in result.warnings)


def test_more_than_ten_images_are_split_into_calls_of_at_most_ten(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=images_response(10)), ScriptedResponse(body=images_response(2)))
    result = make_backend(server).generate(ImageRequest(prompt="a red fox", n=12))

    assert [r.body["n"] for r in server.requests] == [10, 2]
    assert [img.index for img in result.images] == list(range(12))
    assert result.usage.input_tokens == 24


@pytest.mark.parametrize("code", ["moderation_blocked", "content_policy_violation"])
def test_400_moderation_is_permanent_content_blocked_after_one_request(
    server: FakeProvider, code: str
) -> None:
    server.reply(
        api_error(
            400,
            code,
            "Your request was rejected by the safety system. safety_violations=[violence]",
            kind="image_generation_user_error",
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, ContentBlocked)
    assert not error.is_transient
    assert "safety system" in str(error)
    assert len(server.requests) == 1
    usage = usage_of(error)
    assert (usage.ok, usage.images) == (False, 0)


def test_other_400_is_invalid_request(server: FakeProvider) -> None:
    server.reply(api_error(400, "invalid_value", "Invalid value for 'background': 'sparkly'."))
    error = fail(make_backend(server))

    assert isinstance(error, InvalidRequest)
    assert "sparkly" in str(error)


def test_429_rate_limit_is_transient_and_honours_retry_after(server: FakeProvider) -> None:
    server.reply(
        api_error(
            429,
            "rate_limit_exceeded",
            "Rate limit reached for images per minute.",
            kind="requests",
            headers={"retry-after": "7"},
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, RateLimited)
    assert error.is_transient
    assert error.retry_after == 7.0
    assert len(server.requests) == 1


def test_429_insufficient_quota_is_permanent_quota_exhausted(server: FakeProvider) -> None:
    server.reply(
        api_error(
            429,
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
            kind="insufficient_quota",
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, QuotaExhausted)
    assert not error.is_transient
    assert len(server.requests) == 1


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_transient_after_exactly_one_request(server: FakeProvider, status: int) -> None:
    server.reply(
        api_error(status, None, "The server had an error while processing your request.", kind="server_error")
    )
    error = fail(make_backend(server))

    assert isinstance(error, TransientError)
    assert error.is_transient
    assert str(status) in str(error)
    assert len(server.requests) == 1
    usage = usage_of(error)
    assert (usage.ok, usage.backend, usage.model) == (False, "openai", MODEL)


def test_slow_answer_past_the_timeout_is_not_retried_by_default_because_it_may_bill_twice(
    server: FakeProvider,
) -> None:
    server.reply(ScriptedResponse(body=images_response(), delay_s=5.0))
    started = time.monotonic()
    error = fail(make_backend(server), ImageRequest(prompt="a red fox", timeout_s=0.3))

    assert isinstance(error, ProviderTimeout)
    assert not isinstance(error, TransientError)
    assert not error.is_transient
    assert "IMAGEN_RETRY_TIMEOUTS" in str(error)
    assert time.monotonic() - started < 3.0
    assert len(server.requests) == 1


def test_slow_answer_is_a_transient_timeout_when_the_operator_opts_in(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=images_response(), delay_s=5.0))
    error = fail(make_backend(server, retry_timeouts=True), ImageRequest(prompt="a red fox", timeout_s=0.3))

    assert isinstance(error, ProviderTimeout)
    assert isinstance(error, TransientError)
    assert error.is_transient


def test_refused_connection_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(_env_file=None, openai_api_key=KEY, openai_base_url=f"http://127.0.0.1:{port}/v1")
    error = fail(OpenAIBackend(settings))

    assert isinstance(error, TransientError)
    assert not isinstance(error, ProviderTimeout)


def test_401_is_auth_error_that_never_shows_the_key(server: FakeProvider) -> None:
    server.reply(
        api_error(
            401, "invalid_api_key", f"Incorrect API key provided: {KEY}. You can find your API key at ..."
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, AuthError)
    assert not error.is_transient
    assert KEY not in str(error)
    assert "sk-test" not in str(error)
    assert KEY not in repr(usage_of(error))
    assert len(server.requests) == 1


def test_404_is_invalid_request_naming_the_retired_model(server: FakeProvider) -> None:
    server.reply(
        api_error(404, "model_not_found", "The model `dall-e-3` does not exist or you do not have access.")
    )
    error = fail(make_backend(server), ImageRequest(prompt="a red fox", model="dall-e-3"))

    assert isinstance(error, InvalidRequest)
    assert not error.is_transient
    assert "dall-e-3" in str(error)
    assert "not found or retired" in str(error)
    assert len(server.requests) == 1


def test_empty_data_is_no_image(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body={"created": 1764000000, "data": [], "usage": USAGE}))
    error = fail(make_backend(server))

    assert isinstance(error, NoImage)
    usage = usage_of(error)
    assert (usage.ok, usage.input_tokens) == (False, 12)
    assert len(server.requests) == 1


def test_missing_key_is_auth_error_naming_the_variable_without_a_request(server: FakeProvider) -> None:
    error = fail(make_backend(server, openai_api_key=None))

    assert isinstance(error, AuthError)
    assert "OPENAI_API_KEY" in str(error)
    assert server.requests == []


@pytest.mark.parametrize(
    ("model", "size", "reason"),
    [
        (MODEL, (1000, 700), "multiple of 16"),
        (MODEL, (3840, 2400), "pixels"),
        (MODEL, (3072, 768), "too narrow"),
        (MODEL, (512, 512), "pixels"),
        ("gpt-image-1.5", (1536, 864), "not one of its sizes"),
    ],
)
def test_size_the_model_cannot_make_is_refused_before_any_request(
    server: FakeProvider, model: str, size: tuple[int, int], reason: str
) -> None:
    error = fail(make_backend(server), ImageRequest(prompt="a red fox", size=size, model=model))

    assert isinstance(error, InvalidRequest)
    assert reason in str(error)
    assert f"{size[0]}x{size[1]}" in str(error)
    assert server.requests == []


def test_custom_size_within_the_limits_is_sent_as_asked(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=images_response()))
    make_backend(server).generate(ImageRequest(prompt="a red fox", size=(1536, 864)))

    assert server.requests[0].body["size"] == "1536x864"


def test_aspect_ratio_beyond_three_to_one_is_refused_before_any_request(server: FakeProvider) -> None:
    error = fail(make_backend(server), ImageRequest(prompt="a red fox", aspect_ratio="4:1"))

    assert isinstance(error, InvalidRequest)
    assert "4:1" in str(error)
    assert server.requests == []


def test_quality_comes_from_the_setting_and_a_request_overrides_it(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=images_response()), ScriptedResponse(body=images_response()))
    backend = make_backend(server, openai_quality="low")
    backend.generate(ImageRequest(prompt="a red fox"))
    backend.generate(ImageRequest(prompt="a red fox", quality="high"))

    assert [r.body["quality"] for r in server.requests] == ["low", "high"]


def test_403_organization_verification_says_to_verify_not_to_check_the_key(server: FakeProvider) -> None:
    server.reply(
        api_error(
            403,
            None,
            "Your organization must be verified to use the model `gpt-image-2.5-flare`. Please go to: "
            "https://platform.openai.com/settings/organization/general and click on Verify Organization. "
            "If you just verified, it can take up to 15 minutes for access to propagate.",
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, AuthError)
    assert not error.is_transient
    text = str(error)
    assert "organization must be verified" in text
    assert "https://platform.openai.com/settings/organization/general" in text
    assert "check OPENAI_API_KEY" not in text
    assert len(server.requests) == 1


def test_other_403_points_at_the_projects_permissions(server: FakeProvider) -> None:
    server.reply(api_error(403, None, "You have insufficient permissions for this operation."))
    error = fail(make_backend(server))

    assert isinstance(error, AuthError)
    assert "permissions" in str(error)


def test_refusal_with_a_null_code_but_the_image_refusal_type_is_content_blocked(server: FakeProvider) -> None:
    server.reply(
        api_error(
            400,
            None,
            "Your request was rejected by the safety system. safety_violations=[violence].",
            kind="image_generation_user_error",
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, ContentBlocked)
    assert "safety system" in str(error)
    assert usage_of(error).ok is False


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "9"}, 9.0),
        (
            {
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "6m0s",
                "x-ratelimit-remaining-tokens": "5000",
                "x-ratelimit-reset-tokens": "20ms",
            },
            360.0,
        ),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "2.5s"}, 2.5),
        ({}, None),
    ],
    ids=["retry-after-ms-wins", "retry-after", "reset-of-the-exhausted-limit", "later-reset", "none"],
)
def test_429_retry_after_comes_from_the_headers_in_seconds(
    server: FakeProvider, headers: dict[str, str], seconds: float | None
) -> None:
    server.reply(
        api_error(429, "rate_limit_exceeded", "Rate limit reached.", kind="requests", headers=headers)
    )
    error = fail(make_backend(server))

    assert isinstance(error, RateLimited)
    assert error.retry_after == (pytest.approx(seconds) if seconds is not None else None)
