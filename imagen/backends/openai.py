"""The OpenAI backend: GPT image models through the openai SDK's Images API.

`client.images.generate` returns base64 PNGs and a token usage block. The SDK's
retries are switched off (`max_retries=0`): the pipeline owns the one retry
policy, and a retried image call after a read timeout can bill twice. Every SDK
exception is translated here, once, into `imagen.errors`. It must never put the
API key into an error, a log line or a usage record.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping
from typing import Any

import openai
from PIL import Image

from imagen.backends.base import GeneratedImage, ImageRequest, ImageResult
from imagen.backends.sdk import (
    CallLedger,
    LazyClient,
    attach_usage,
    one_line,
    retry_after_from_headers,
    timeout_error,
)
from imagen.backends.sizes import check_size, size_for_aspect, size_rule
from imagen.config import Settings
from imagen.errors import (
    AuthError,
    ContentBlocked,
    ImagenError,
    InvalidRequest,
    NoImage,
    QuotaExhausted,
    RateLimited,
    TransientError,
)

MAX_N_PER_CALL = 10
# Options passed through to images.generate; everything else in request.options earns a warning.
PASSTHROUGH_OPTIONS = ("background", "moderation")
QUALITIES = ("auto", "low", "medium", "high", "xhigh", "max")
BLOCKED_CODES = frozenset({"moderation_blocked", "content_policy_violation"})
# The refusal type of the Images API; its `code` may be null (seen through relays and on edits).
REFUSAL_TYPE = "image_generation_user_error"
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached"})
VERIFY_URL = "https://platform.openai.com/settings/organization/general"
_KEY_LIKE = re.compile(r"sk-[0-9A-Za-z_*\-]{4,}")
_VERIFICATION = re.compile(
    r"must be verified|verify (your )?organi[sz]ation|organi[sz]ation verification", re.I
)


def choose_size(request: ImageRequest, model: str) -> tuple[str, list[str]]:
    """'WxH' to send for `model`, plus a warning when an aspect ratio is only approximated.

    An explicit size the model cannot make is refused here (InvalidRequest), before
    a round trip; an aspect ratio becomes the exact size on models that take any
    size (gpt-image-2, 2.5, 2.6) and the nearest standard size on the others.
    """
    rule = size_rule("openai", model)
    if request.size:
        check_size(rule, request.size)
        width, height = request.size
        return f"{width}x{height}", []
    if not request.aspect_ratio:
        return "1024x1024", []
    (width, height), warnings = size_for_aspect(rule, request.aspect_ratio)
    return f"{width}x{height}", warnings


def _redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    return _KEY_LIKE.sub("sk-***", text)


class _CallLedger(CallLedger):
    """Token counts across the calls of one `generate` (more than one only when n > 10)."""

    def record(self, usage: Any, request_id: str | None) -> None:
        if request_id:
            self.request_ids.append(request_id)
        if usage is None:
            self.calls.append({})
            return
        self.calls.append(usage.model_dump(mode="json", exclude_none=True))
        details = usage.output_tokens_details
        # Without output details every output token of an image model is an image token.
        image_tokens = details.image_tokens if details is not None else usage.output_tokens
        self.add(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            image_output_tokens=image_tokens,
        )


class OpenAIBackend:
    """GPT image models via `images.generate`: one call per up to ten images."""

    name = "openai"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client = LazyClient(self._build_client)

    def default_model(self) -> str:
        return self._settings.openai_model

    def _secret(self) -> str | None:
        key = self._settings.openai_api_key
        return key.get_secret_value() if key else None

    def _build_client(self) -> openai.OpenAI:
        key = self._secret()
        if not key:
            raise AuthError("openai backend: no API key; set OPENAI_API_KEY")
        return openai.OpenAI(
            api_key=key,
            base_url=self._settings.openai_base_url or None,
            max_retries=0,
            timeout=self._settings.provider_timeout,
        )

    def generate(self, request: ImageRequest) -> ImageResult:
        """Make `request.n` images; the per-call timeout is `request.timeout_s`."""
        model = request.model or self.default_model()
        size, warnings = choose_size(request, model)
        quality = request.quality or self._settings.openai_quality
        if quality not in QUALITIES:
            raise InvalidRequest(f"openai: quality must be one of {', '.join(QUALITIES)}, not {quality!r}")
        if request.seed is not None:
            warnings.append("openai has no seed; seed was ignored and images are not reproducible")
        if request.negative_prompt:
            warnings.append("openai has no negative prompt; negative_prompt was ignored")
        extra = {k: request.options[k] for k in PASSTHROUGH_OPTIONS if k in request.options}
        extra["quality"] = quality
        warnings.extend(
            f"openai ignores option {key!r}" for key in request.options if key not in PASSTHROUGH_OPTIONS
        )
        client = self._client.get().with_options(timeout=request.timeout_s, max_retries=0)
        ledger = _CallLedger(self.name, model)
        images: list[GeneratedImage] = []
        while len(images) < request.n:
            count = min(MAX_N_PER_CALL, request.n - len(images))
            try:
                raw = client.images.with_raw_response.generate(
                    model=model,
                    prompt=request.prompt,
                    n=count,
                    size=size,
                    output_format="png",
                    **extra,
                )
                response = raw.parse()
            except Exception as exc:
                error = self._translate(exc, model)
                raise attach_usage(error, ledger.usage(error=str(error))) from None
            ledger.record(response.usage, raw.headers.get("x-request-id"))
            decoded = self._decode(response, model, ledger, first_index=len(images))
            images.extend(decoded)
            ledger.images = len(images)
        return ImageResult(images=images, usage=ledger.usage(), model=model, warnings=warnings)

    @staticmethod
    def _decode(response: Any, model: str, ledger: _CallLedger, *, first_index: int) -> list[GeneratedImage]:
        images: list[GeneratedImage] = []
        for item in response.data or []:
            if not item.b64_json:
                continue
            try:
                data = base64.b64decode(item.b64_json, validate=True)
                with Image.open(io.BytesIO(data)) as img:
                    width, height = img.size
                    mime = Image.MIME.get(img.format or "", "image/png")
            except (binascii.Error, ValueError, OSError):
                bad = NoImage(f"openai model {model}: returned image data that does not decode")
                raise attach_usage(bad, ledger.usage(error=str(bad))) from None
            images.append(
                GeneratedImage(
                    data=data, mime=mime, width=width, height=height, index=first_index + len(images)
                )
            )
        if not images:
            error = NoImage(f"openai model {model}: the response held no image data")
            raise attach_usage(error, ledger.usage(error=str(error)))
        return images

    def _translate(self, exc: Exception, model: str) -> ImagenError:
        """One SDK exception -> the imagen error the pipeline keys on."""
        secret = self._secret()
        if isinstance(exc, ImagenError):
            return exc
        if isinstance(exc, openai.APITimeoutError):
            return timeout_error("openai", model, exc.__cause__, retry=self._settings.retry_timeouts)
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc
            detail = one_line(_redact(f"{type(cause).__name__}: {cause}", secret))
            return TransientError(f"openai: connection failed ({detail})")
        if isinstance(exc, openai.APIStatusError):
            return self._translate_status(exc, model, secret)
        raise exc

    @staticmethod
    def _translate_status(exc: openai.APIStatusError, model: str, secret: str | None) -> ImagenError:
        status = exc.status_code
        code = exc.code or ""
        label = f"{status} {code}".strip()
        body = exc.body if isinstance(exc.body, Mapping) else {}
        message = one_line(_redact(str(body.get("message") or exc.message), secret))
        request_id = f" (request id {exc.request_id})" if exc.request_id else ""
        if code in BLOCKED_CODES or (exc.type == REFUSAL_TYPE and not code):
            return ContentBlocked(
                f"openai model {model}: refused by the safety system ({label}): {message}{request_id}"
            )
        if code in QUOTA_CODES or exc.type == "insufficient_quota":
            return QuotaExhausted(f"openai: quota exhausted ({label}): {message}{request_id}")
        if status == 429:
            return RateLimited(
                f"openai model {model}: rate limited ({label}): {message}{request_id}",
                retry_after=retry_after_from_headers(exc.response.headers),
            )
        if status >= 500 or status in (408, 409):
            return TransientError(
                f"openai model {model}: provider error ({label}): {message}{request_id}",
                retry_after=retry_after_from_headers(exc.response.headers),
            )
        if status == 403 and _VERIFICATION.search(message):
            return AuthError(
                f"openai: the organization must be verified before it can use {model} ({label}): {message}; "
                f"the API key is fine: verify the organization at {VERIFY_URL} (access can take "
                "up to 15 minutes to arrive), or set IMAGEN_OPENAI_MODEL to a model it may use"
            )
        if status == 403:
            return AuthError(
                f"openai: not allowed to use {model} ({label}): {message}; check the API key's project "
                "permissions and model access, and that the organization may use the API from here"
            )
        if status == 401:
            return AuthError(f"openai: credentials rejected ({label}): {message}; check OPENAI_API_KEY")
        if status == 404:
            return InvalidRequest(f"openai model {model!r} not found or retired ({label}): {message}")
        return InvalidRequest(f"openai model {model}: request rejected ({label}): {message}{request_id}")
