"""Contract tests for the Gemini backend against a loopback server speaking the generateContent wire format."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from imagen.backends.base import ImageRequest, Usage
from imagen.backends.gemini import GeminiBackend, nearest_aspect_ratio
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

KEY = "AIzaSyTEST-secret-0123456789abcdef"
MODEL = "gemini-2.5-flash-image"
PATH = f"/v1beta/models/{MODEL}:generateContent"
USAGE = {
    "promptTokenCount": 9,
    "candidatesTokenCount": 1295,
    "totalTokenCount": 1304,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}],
    "candidatesTokensDetails": [
        {"modality": "IMAGE", "tokenCount": 1290},
        {"modality": "TEXT", "tokenCount": 5},
    ],
}


def image_response(width: int = 64, height: int = 48, *, thought_first: bool = False) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"inlineData": {"mimeType": "image/png", "data": png_b64(width, height)}}]
    if thought_first:
        parts.insert(0, {"thought": True, "inlineData": {"mimeType": "image/png", "data": png_b64(8, 8)}})
    return {
        "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": USAGE,
        "modelVersion": MODEL,
        "responseId": "resp-1",
    }


def api_error(
    code: int, status: str, message: str, details: list[dict[str, Any]] | None = None
) -> ScriptedResponse:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return ScriptedResponse(code, {"error": error})


def quota_details(quota_id: str, retry_delay: str | None = None) -> list[dict[str, Any]]:
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                    "quotaId": quota_id,
                    "quotaDimensions": {"model": MODEL, "location": "global"},
                }
            ],
        }
    ]
    if retry_delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay})
    return details


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_provider_env(monkeypatch)


@pytest.fixture
def server() -> Iterator[FakeProvider]:
    with fake_provider() as provider:
        yield provider


def make_backend(server: FakeProvider, **overrides: Any) -> GeminiBackend:
    """A backend configured as an operator would: key and address only, API version left unset."""
    fields: dict[str, Any] = {"gemini_api_key": KEY, "gemini_base_url": server.url}
    fields.update(overrides)
    return GeminiBackend(Settings(_env_file=None, **fields))


def usage_of(error: Exception) -> Usage:
    """The usage a failed call carries for the ledger."""
    usage = getattr(error, "usage", None)
    assert isinstance(usage, Usage)
    return usage


def fail(backend: GeminiBackend, request: ImageRequest | None = None) -> Any:
    with pytest.raises(Exception) as caught:
        backend.generate(request or ImageRequest(prompt="a red fox"))
    return caught.value


def test_each_image_is_one_generate_content_call_with_model_prompt_aspect_and_seed(
    server: FakeProvider,
) -> None:
    server.reply(ScriptedResponse(body=image_response()), ScriptedResponse(body=image_response()))
    result = make_backend(server).generate(
        ImageRequest(prompt="a red fox", n=2, aspect_ratio="16:9", seed=42)
    )

    assert len(server.requests) == 2
    for i, sent in enumerate(server.requests):
        assert sent.method == "POST"
        assert sent.path == PATH
        assert sent.headers["x-goog-api-key"] == KEY
        assert sent.body["contents"] == [{"parts": [{"text": "a red fox"}], "role": "user"}]
        assert sent.body["generationConfig"] == {
            "candidateCount": 1,
            "seed": 42 + i,
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "16:9"},
        }
    assert [(img.width, img.height, img.mime, img.seed, img.index) for img in result.images] == [
        (64, 48, "image/png", 42, 0),
        (64, 48, "image/png", 43, 1),
    ]
    assert result.images[0].data.startswith(b"\x89PNG")
    assert result.model == MODEL
    assert result.warnings == []


def test_usage_sums_token_counts_over_calls_and_prices_image_tokens_at_image_rate(
    server: FakeProvider,
) -> None:
    server.reply(ScriptedResponse(body=image_response()), ScriptedResponse(body=image_response()))
    usage = make_backend(server).generate(ImageRequest(prompt="a red fox", n=2)).usage

    assert (usage.backend, usage.model, usage.images, usage.ok) == ("gemini", MODEL, 2, True)
    assert (usage.input_tokens, usage.output_tokens, usage.image_output_tokens) == (18, 2590, 2580)
    assert usage.raw["calls"][0]["candidatesTokensDetails"][0] == {"modality": "IMAGE", "tokenCount": 1290}
    assert estimate_cost(usage) == pytest.approx(2 * (9 * 0.30 + 1290 * 30.0) / 1e6)


def test_thought_images_are_skipped_and_the_final_image_kept(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=image_response(64, 48, thought_first=True)))
    result = make_backend(server).generate(ImageRequest(prompt="a red fox"))

    assert [(img.width, img.height) for img in result.images] == [(64, 48)]


def test_explicit_size_becomes_nearest_aspect_ratio_with_a_warning(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=image_response()))
    result = make_backend(server).generate(ImageRequest(prompt="a red fox", size=(1000, 700)))

    assert server.requests[0].body["generationConfig"]["imageConfig"] == {"aspectRatio": "3:2"}
    assert any("1000x700" in w and "3:2" in w and "nearest" in w for w in result.warnings)


def test_nearest_aspect_ratio_keeps_exact_ratios_and_rounds_others() -> None:
    assert nearest_aspect_ratio(1920, 1080) == "16:9"
    assert nearest_aspect_ratio(1080, 1920) == "9:16"
    assert nearest_aspect_ratio(1024, 1024) == "1:1"
    assert nearest_aspect_ratio(2520, 1080) == "21:9"
    assert nearest_aspect_ratio(5, 4) == "5:4"
    assert nearest_aspect_ratio(4, 5) == "4:5"
    assert nearest_aspect_ratio(7, 5) == "4:3"


def test_negative_prompt_is_a_warning_not_an_error_and_is_not_sent(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=image_response()))
    result = make_backend(server).generate(ImageRequest(prompt="a red fox", negative_prompt="blurry"))

    assert "blurry" not in str(server.requests[0].body)
    assert any("negative" in w for w in result.warnings)


def test_beta_api_version_shorthand_selects_v1beta_path(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=image_response()))
    make_backend(server, gemini_api_version="beta").generate(ImageRequest(prompt="a red fox"))

    assert server.requests[0].path == PATH


def test_vertex_mode_uses_publisher_path_and_sdk_read_express_key(
    server: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_GENAI_USE_ENTERPRISE", "true")
    monkeypatch.setenv("GOOGLE_API_KEY", "vertex-express-key")
    server.reply(ScriptedResponse(body=image_response()))
    backend = make_backend(server, gemini_api_key=None, gemini_api_version="v1")
    backend.generate(ImageRequest(prompt="a red fox"))

    assert server.requests[0].path == f"/v1/publishers/google/models/{MODEL}:generateContent"
    assert server.requests[0].headers["x-goog-api-key"] == "vertex-express-key"


def test_prompt_blocked_200_is_content_blocked_with_reason_and_token_usage(server: FakeProvider) -> None:
    server.reply(
        ScriptedResponse(
            body={
                "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
                "modelVersion": MODEL,
            }
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, ContentBlocked)
    assert not error.is_transient
    assert "PROHIBITED_CONTENT" in str(error)
    assert len(server.requests) == 1
    usage = usage_of(error)
    assert (usage.ok, usage.images, usage.input_tokens) == (False, 0, 9)
    assert usage.error == str(error)


def test_output_blocked_200_with_image_safety_finish_reason_is_content_blocked(server: FakeProvider) -> None:
    server.reply(
        ScriptedResponse(
            body={
                "candidates": [{"content": {"role": "model", "parts": []}, "finishReason": "IMAGE_SAFETY"}],
                "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 0, "totalTokenCount": 9},
            }
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, ContentBlocked)
    assert "IMAGE_SAFETY" in str(error)
    assert len(server.requests) == 1


def test_no_image_finish_reason_is_no_image_not_a_block(server: FakeProvider) -> None:
    server.reply(
        ScriptedResponse(
            body={
                "candidates": [
                    {
                        "content": {"role": "model", "parts": [{"text": "I can describe a fox instead."}]},
                        "finishReason": "NO_IMAGE",
                    }
                ],
                "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 8, "totalTokenCount": 17},
            }
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, NoImage)
    assert not isinstance(error, ContentBlocked)
    assert "NO_IMAGE" in str(error)
    usage = usage_of(error)
    assert (usage.input_tokens, usage.output_tokens) == (9, 8)
    assert len(server.requests) == 1


def test_per_minute_429_is_transient_rate_limit_honouring_retry_delay(server: FakeProvider) -> None:
    server.reply(
        api_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Resource has been exhausted (e.g. check quota).",
            quota_details("GenerateRequestsPerMinutePerProjectPerModel", retry_delay="17s"),
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, RateLimited)
    assert error.is_transient
    assert error.retry_after == 17.0
    assert len(server.requests) == 1


def test_per_day_free_tier_429_is_permanent_quota_exhausted(server: FakeProvider) -> None:
    server.reply(
        api_error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
            quota_details("GenerateRequestsPerDayPerProjectPerModel-FreeTier", retry_delay="40s"),
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, QuotaExhausted)
    assert not error.is_transient
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("code", "status"), [(500, "INTERNAL"), (503, "UNAVAILABLE"), (504, "DEADLINE_EXCEEDED")]
)
def test_server_errors_are_transient_after_exactly_one_request(
    server: FakeProvider, code: int, status: str
) -> None:
    server.reply(api_error(code, status, "The model is overloaded. Please try again later."))
    error = fail(make_backend(server))

    assert isinstance(error, TransientError)
    assert error.is_transient
    assert str(code) in str(error)
    assert len(server.requests) == 1
    usage = usage_of(error)
    assert (usage.ok, usage.backend, usage.model) == (False, "gemini", MODEL)


def test_slow_answer_past_the_timeout_is_not_retried_by_default_because_it_may_bill_twice(
    server: FakeProvider,
) -> None:
    server.reply(ScriptedResponse(body=image_response(), delay_s=5.0))
    started = time.monotonic()
    error = fail(make_backend(server), ImageRequest(prompt="a red fox", timeout_s=0.3))

    assert isinstance(error, ProviderTimeout)
    assert not isinstance(error, TransientError)
    assert not error.is_transient
    assert "bill" in str(error)
    assert time.monotonic() - started < 3.0
    assert len(server.requests) == 1


def test_slow_answer_is_a_transient_timeout_when_the_operator_opts_in(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=image_response(), delay_s=5.0))
    error = fail(make_backend(server, retry_timeouts=True), ImageRequest(prompt="a red fox", timeout_s=0.3))

    assert isinstance(error, ProviderTimeout)
    assert error.is_transient


def test_refused_connection_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = Settings(
        _env_file=None,
        gemini_api_key=KEY,
        gemini_base_url=f"http://127.0.0.1:{port}",
    )
    error = fail(GeminiBackend(settings))

    assert isinstance(error, TransientError)
    assert not isinstance(error, ProviderTimeout)


def test_401_is_auth_error_that_never_shows_the_key(server: FakeProvider) -> None:
    server.reply(api_error(401, "UNAUTHENTICATED", f"Request had invalid authentication credentials: {KEY}"))
    error = fail(make_backend(server))

    assert isinstance(error, AuthError)
    assert not error.is_transient
    assert KEY not in str(error)
    assert KEY not in repr(usage_of(error))
    assert len(server.requests) == 1


def test_400_api_key_invalid_is_auth_error_that_never_shows_the_key(server: FakeProvider) -> None:
    details = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]
    server.reply(api_error(400, "INVALID_ARGUMENT", f"API key not valid ({KEY}).", details))
    error = fail(make_backend(server))

    assert isinstance(error, AuthError)
    assert KEY not in str(error)


def test_404_is_invalid_request_naming_the_retired_model(server: FakeProvider) -> None:
    server.reply(api_error(404, "NOT_FOUND", f"models/{MODEL} is not found for API version v1beta"))
    error = fail(make_backend(server))

    assert isinstance(error, InvalidRequest)
    assert not error.is_transient
    assert MODEL in str(error)
    assert "not found at API version v1beta" in str(error)
    assert "retired" in str(error)
    assert len(server.requests) == 1


def test_400_about_safety_is_content_blocked_and_other_400_is_invalid_request(server: FakeProvider) -> None:
    server.reply(
        api_error(
            400, "INVALID_ARGUMENT", "The prompt could not be submitted: it violates the safety policy."
        ),
        api_error(400, "INVALID_ARGUMENT", "Unsupported aspect ratio."),
    )
    backend = make_backend(server)

    assert isinstance(fail(backend), ContentBlocked)
    other = fail(backend)
    assert isinstance(other, InvalidRequest)
    assert "Unsupported aspect ratio" in str(other)


def test_failure_after_a_successful_image_reports_tokens_already_spent(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=image_response()), api_error(503, "UNAVAILABLE", "overloaded"))
    error = fail(make_backend(server), ImageRequest(prompt="a red fox", n=2))

    assert isinstance(error, TransientError)
    usage = usage_of(error)
    assert (usage.ok, usage.images, usage.image_output_tokens) == (
        False,
        1,
        1290,
    )
    assert len(server.requests) == 2


def test_missing_key_is_auth_error_naming_both_variables_without_a_request(server: FakeProvider) -> None:
    error = fail(make_backend(server, gemini_api_key=None))

    assert isinstance(error, AuthError)
    assert "GEMINI_API_KEY" in str(error)
    assert "GOOGLE_API_KEY" in str(error)
    assert "\n" not in str(error)
    assert server.requests == []


def test_api_version_left_unset_goes_to_v1beta_where_image_output_is_documented(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(body=image_response()))
    make_backend(server).generate(ImageRequest(prompt="a red fox"))

    assert server.requests[0].path == f"/v1beta/models/{MODEL}:generateContent"


def test_an_explicit_v1_is_honoured_and_its_404_names_the_version_to_change(server: FakeProvider) -> None:
    server.reply(
        api_error(
            404,
            "NOT_FOUND",
            f"models/{MODEL} is not found for API version v1, or is not supported for generateContent.",
        )
    )
    error = fail(make_backend(server, gemini_api_version="v1"))

    assert server.requests[0].path == f"/v1/models/{MODEL}:generateContent"
    assert isinstance(error, InvalidRequest)
    assert "API version v1" in str(error)
    assert "GOOGLE_GENAI_API_VERSION" in str(error)


def test_unknown_field_400_on_another_version_points_at_the_version(server: FakeProvider) -> None:
    server.reply(
        api_error(
            400,
            "INVALID_ARGUMENT",
            "Invalid JSON payload received. Unknown name \"imageConfig\" at 'generation_config': Cannot find field.",
        )
    )
    error = fail(make_backend(server, gemini_api_version="v1"))

    assert isinstance(error, InvalidRequest)
    assert "GOOGLE_GENAI_API_VERSION" in str(error)


def test_response_without_modality_breakdown_still_costs_an_image(server: FakeProvider) -> None:
    body = image_response()
    body["usageMetadata"] = {"promptTokenCount": 9, "candidatesTokenCount": 1290, "totalTokenCount": 1299}
    server.reply(ScriptedResponse(body=body))
    usage = make_backend(server).generate(ImageRequest(prompt="a red fox")).usage

    assert usage.image_output_tokens == 1290
    cost = estimate_cost(usage)
    assert cost == pytest.approx((9 * 0.30 + 1290 * 30.0) / 1e6)
    assert 0.03 < cost < 0.05


def test_text_only_answer_without_breakdown_is_not_priced_as_image_tokens(server: FakeProvider) -> None:
    server.reply(
        ScriptedResponse(
            body={
                "candidates": [
                    {"content": {"role": "model", "parts": [{"text": "no"}]}, "finishReason": "NO_IMAGE"}
                ],
                "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 8, "totalTokenCount": 17},
            }
        )
    )
    error = fail(make_backend(server))

    assert usage_of(error).image_output_tokens is None


@pytest.mark.parametrize(
    ("model", "aspect", "sent", "warned"),
    [
        (MODEL, "4:5", "4:5", False),
        (MODEL, "5:4", "5:4", False),
        (MODEL, "4:1", "21:9", True),
        ("gemini-3.1-flash-image", "4:1", "4:1", False),
        ("gemini-3.1-flash-lite-image", "1:8", "1:8", False),
    ],
)
def test_aspect_ratios_follow_the_model(
    server: FakeProvider, model: str, aspect: str, sent: str, warned: bool
) -> None:
    body = image_response()
    body["modelVersion"] = model
    server.reply(ScriptedResponse(body=body))
    result = make_backend(server).generate(ImageRequest(prompt="a red fox", aspect_ratio=aspect, model=model))

    assert server.requests[0].body["generationConfig"]["imageConfig"] == {"aspectRatio": sent}
    assert bool(result.warnings) is warned


def test_person_generation_with_an_api_key_is_a_typed_invalid_request_without_a_request(
    server: FakeProvider,
) -> None:
    request = ImageRequest(prompt="a red fox", options={"person_generation": "ALLOW_ADULT"})
    error = fail(make_backend(server), request)

    assert isinstance(error, InvalidRequest)
    assert "Vertex" in str(error)
    assert server.requests == []


def test_free_tier_per_minute_429_with_a_real_limit_is_a_transient_rate_limit(server: FakeProvider) -> None:
    details = quota_details("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", retry_delay="21s")
    details[0]["violations"][0]["quotaValue"] = "10"
    server.reply(api_error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.", details))
    error = fail(make_backend(server))

    assert isinstance(error, RateLimited)
    assert error.retry_after == 21.0


def test_free_tier_429_with_limit_zero_is_permanent_and_says_to_enable_billing(server: FakeProvider) -> None:
    details = quota_details("GenerateRequestsPerMinutePerProjectPerModel-FreeTier")
    details[0]["violations"][0]["quotaValue"] = "0"
    server.reply(
        api_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, "
            f"limit: 0, model: {MODEL}",
            details,
        )
    )
    error = fail(make_backend(server))

    assert isinstance(error, QuotaExhausted)
    assert "billing" in str(error)


def test_429_without_retry_info_takes_retry_after_from_the_header(server: FakeProvider) -> None:
    error_body = {"error": {"code": 429, "message": "Resource exhausted.", "status": "RESOURCE_EXHAUSTED"}}
    server.reply(ScriptedResponse(429, error_body, headers={"retry-after": "12"}))
    error = fail(make_backend(server))

    assert isinstance(error, RateLimited)
    assert error.retry_after == 12.0


def vertex_refresh_error(token_server: FakeProvider | None) -> Exception:
    """The exception google-auth really raises when a Vertex token refresh meets this token endpoint."""
    from google.auth.transport.requests import Request
    from google.oauth2.credentials import Credentials

    if token_server is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            uri = f"http://127.0.0.1:{sock.getsockname()[1]}/token"
    else:
        uri = f"{token_server.url}/token"
    credentials = Credentials(token=None, refresh_token="r", client_id="c", client_secret="s", token_uri=uri)
    with pytest.raises(Exception) as caught:
        credentials.refresh(Request())  # type: ignore[no-untyped-call]
    return caught.value


def test_vertex_token_refresh_that_cannot_reach_the_token_endpoint_is_transient(server: FakeProvider) -> None:
    error = make_backend(server).translate(vertex_refresh_error(None), MODEL)

    assert isinstance(error, TransientError)
    assert not isinstance(error, AuthError)


def test_vertex_token_refresh_refused_by_the_token_endpoint_is_an_auth_error(server: FakeProvider) -> None:
    server.reply(ScriptedResponse(400, {"error": "invalid_grant", "error_description": "Bad Request"}))
    error = make_backend(server).translate(vertex_refresh_error(server), MODEL)

    assert isinstance(error, AuthError)
    assert "invalid_grant" in str(error)


def test_transport_errors_outside_httpx2_are_translated(server: FakeProvider) -> None:
    import requests

    backend = make_backend(server)

    assert isinstance(backend.translate(requests.exceptions.ConnectionError("reset"), MODEL), TransientError)
    assert isinstance(backend.translate(requests.exceptions.ConnectTimeout("slow"), MODEL), TransientError)
    read_timeout = backend.translate(requests.exceptions.ReadTimeout("slow"), MODEL)
    assert isinstance(read_timeout, ProviderTimeout)
    assert not read_timeout.is_transient
    assert isinstance(backend.translate(ConnectionResetError("reset"), MODEL), TransientError)
