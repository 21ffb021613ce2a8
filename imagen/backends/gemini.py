"""The Gemini backend: Gemini image models through google-genai `generate_content`.

One provider call per image (the API has no count parameter), each with
`response_modalities=["IMAGE"]` and an `ImageConfig` aspect ratio. The SDK's own
retries stay off: the pipeline owns the one retry policy, so this module only
translates every outcome into `imagen.errors` once. A 200 without an image is a
failure (blocked or no image), never a success. It must never put the API key
into an error, a log line or a usage record.
"""

from __future__ import annotations

import io
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any

import httpx2
import pydantic
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image

from imagen.backends.base import GeneratedImage, ImageRequest, ImageResult, Usage
from imagen.backends.sdk import LazyClient, attach_usage, one_line
from imagen.backends.sizes import parse_aspect
from imagen.config import Settings
from imagen.errors import (
    AuthError,
    ContentBlocked,
    ImagenError,
    InvalidRequest,
    NoImage,
    ProviderTimeout,
    QuotaExhausted,
    RateLimited,
    TransientError,
)

# The ratios `ImageConfig.aspect_ratio` documents for generateContent (types.py, google-genai 3.6.1).
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9", "21:9")
DEFAULT_ASPECT = "1:1"
# Options passed through to ImageConfig; everything else in request.options earns a warning.
IMAGE_CONFIG_OPTIONS = ("image_size", "person_generation")

# finish_reason values that mean the safety system withheld the output (providers.md §1.3).
BLOCKING_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "IMAGE_OTHER",
        "MODEL_ARMOR",
    }
)
TRANSIENT_CODES = frozenset({408, 500, 502, 503, 504})
_SAFETY_WORDS = re.compile(r"safety|prohibited|blocklist|responsible ai|content polic", re.IGNORECASE)
_KEY_LIKE = re.compile(r"AIza[0-9A-Za-z_\-]{10,}")


def nearest_aspect_ratio(width: int, height: int) -> str:
    """The supported ratio closest to width:height (compared on a log scale, so 2:1 and 1:2 are symmetric)."""
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = parse_aspect(ratio)
        return abs(math.log(w / h) - target)

    return min(ASPECT_RATIOS, key=distance)


def choose_aspect_ratio(request: ImageRequest) -> tuple[str, list[str]]:
    """The aspect ratio to send, plus warnings when the request cannot be honoured exactly.

    Gemini picks the pixel size itself (about 1K on the long side unless `image_size`
    says otherwise), so an explicit size is always approximated by its nearest ratio.
    """
    warnings: list[str] = []
    if request.size:
        width, height = request.size
        ratio = nearest_aspect_ratio(width, height)
        rw, rh = parse_aspect(ratio)
        exact = width * rh == height * rw
        warnings.append(
            f"gemini cannot produce an exact {width}x{height} image; asked for aspect ratio {ratio}"
            + ("" if exact else " (the nearest supported)")
            + " and the model picks the pixel size"
        )
        return ratio, warnings
    if request.aspect_ratio:
        w, h = parse_aspect(request.aspect_ratio)
        canonical = f"{w}:{h}"
        if canonical in ASPECT_RATIOS:
            return canonical, warnings
        ratio = nearest_aspect_ratio(w, h)
        warnings.append(
            f"gemini does not support aspect ratio {request.aspect_ratio}; using the nearest, {ratio}"
        )
        return ratio, warnings
    return DEFAULT_ASPECT, warnings


def _redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    return _KEY_LIKE.sub("***", text)


def _enum_value(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def vertex_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the SDK will run in Vertex ("Enterprise") mode, by the SDK's own env rule.

    GOOGLE_GENAI_USE_ENTERPRISE wins over the legacy GOOGLE_GENAI_USE_VERTEXAI. Read here
    (not in Settings) because the SDK reads the same variables and the two must agree.
    """
    env = os.environ if environ is None else environ
    for name in ("GOOGLE_GENAI_USE_ENTERPRISE", "GOOGLE_GENAI_USE_VERTEXAI"):
        value = env.get(name)
        if value is not None:
            return value.strip().lower() in ("true", "1")
    return False


def _api_version(configured: str | None, *, vertex: bool) -> str | None:
    # GOOGLE_GENAI_API_VERSION=beta is the SDK's shorthand for the beta path of either API.
    if configured == "beta":
        return "v1beta1" if vertex else "v1beta"
    return configured or None


def _parse_duration(text: Any) -> float | None:
    """'12s' or '1.5s' (protobuf Duration JSON) -> seconds."""
    if not isinstance(text, str):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)s\s*", text)
    return float(match[1]) if match else None


def _error_details(payload: Any) -> list[Mapping[str, Any]]:
    if isinstance(payload, list) and payload:
        payload = payload[0]
    if not isinstance(payload, Mapping):
        return []
    inner = payload.get("error", payload)
    details = inner.get("details") if isinstance(inner, Mapping) else None
    return [d for d in details or [] if isinstance(d, Mapping)]


def _is_daily_or_free_tier_quota(details: list[Mapping[str, Any]]) -> bool:
    for detail in details:
        for violation in detail.get("violations") or []:
            if not isinstance(violation, Mapping):
                continue
            quota_id = str(violation.get("quotaId", ""))
            if "PerDay" in quota_id or "FreeTier" in quota_id:
                return True
    return False


def _retry_delay(details: list[Mapping[str, Any]], headers: Any) -> float | None:
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = _parse_duration(detail.get("retryDelay"))
            if delay is not None:
                return delay
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _has_error_reason(details: list[Mapping[str, Any]], reason: str) -> bool:
    return any(d.get("reason") == reason for d in details)


class _CallLedger:
    """Token counts across the calls of one `generate`, so a failure can report what was spent."""

    def __init__(self, backend: str, model: str) -> None:
        self.backend = backend
        self.model = model
        self.started = time.monotonic()
        self.images = 0
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.image_output_tokens: int | None = None
        self.thought_tokens: int | None = None
        self.calls: list[dict[str, Any]] = []

    @staticmethod
    def _add(total: int | None, value: int | None) -> int | None:
        if value is None:
            return total
        return (total or 0) + value

    def record(self, metadata: types.GenerateContentResponseUsageMetadata | None) -> None:
        if metadata is None:
            self.calls.append({})
            return
        self.calls.append(metadata.model_dump(mode="json", exclude_none=True, by_alias=True))
        image_tokens = None
        for detail in metadata.candidates_tokens_details or []:
            if _enum_value(detail.modality) == "IMAGE":
                image_tokens = (image_tokens or 0) + (detail.token_count or 0)
        self.input_tokens = self._add(self.input_tokens, metadata.prompt_token_count)
        self.output_tokens = self._add(self.output_tokens, metadata.candidates_token_count)
        self.image_output_tokens = self._add(self.image_output_tokens, image_tokens)
        self.thought_tokens = self._add(self.thought_tokens, metadata.thoughts_token_count)

    def usage(self, *, error: str | None = None) -> Usage:
        return Usage(
            backend=self.backend,
            model=self.model,
            images=self.images,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            image_output_tokens=self.image_output_tokens,
            thought_tokens=self.thought_tokens,
            latency_ms=(time.monotonic() - self.started) * 1000,
            ok=error is None,
            error=error,
            raw={"calls": list(self.calls)},
        )


class GeminiBackend:
    """Gemini image models via `generate_content`, with an API key or Vertex credentials."""

    name = "gemini"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client = LazyClient(self._build_client)

    def default_model(self) -> str:
        return self._settings.gemini_model

    def _secret(self) -> str | None:
        key = self._settings.gemini_api_key
        return key.get_secret_value() if key else None

    def _build_client(self) -> genai.Client:
        vertex = vertex_enabled()
        http_options = types.HttpOptions(
            base_url=self._settings.gemini_base_url or None,
            api_version=_api_version(self._settings.gemini_api_version, vertex=vertex),
        )
        if not vertex:
            key = self._secret()
            if not key:
                raise AuthError(
                    "gemini backend: no API key; set GEMINI_API_KEY or GOOGLE_API_KEY "
                    "(or GOOGLE_GENAI_USE_ENTERPRISE=true for Vertex credentials)"
                )
            return genai.Client(vertexai=False, api_key=key, http_options=http_options)
        # Vertex: the SDK reads GOOGLE_CLOUD_PROJECT/LOCATION, an express-mode key and ADC
        # itself, with its own precedence rules; passing the key here would override them.
        try:
            return genai.Client(vertexai=True, http_options=http_options)
        except Exception as exc:
            raise AuthError(
                "gemini backend (Vertex): no usable credentials; set GOOGLE_CLOUD_PROJECT and "
                "GOOGLE_CLOUD_LOCATION with application default credentials, or GOOGLE_API_KEY "
                f"for express mode ({one_line(_redact(str(exc), self._secret()))})"
            ) from None

    def generate(self, request: ImageRequest) -> ImageResult:
        """Make `request.n` images, one `generate_content` call each (seed + i when seeded)."""
        model = request.model or self.default_model()
        aspect, warnings = choose_aspect_ratio(request)
        if request.negative_prompt:
            warnings.append("gemini has no negative prompt; negative_prompt was ignored")
        image_options = {k: request.options[k] for k in IMAGE_CONFIG_OPTIONS if k in request.options}
        warnings.extend(
            f"gemini ignores option {key!r}" for key in request.options if key not in IMAGE_CONFIG_OPTIONS
        )
        client = self._client.get()
        ledger = _CallLedger(self.name, model)
        images: list[GeneratedImage] = []
        echoed_model = model
        for index in range(request.n):
            seed = request.seed + index if request.seed is not None else None
            config = self._config(request, aspect, image_options, seed)
            try:
                response = client.models.generate_content(model=model, contents=request.prompt, config=config)
            except Exception as exc:
                error = self._translate(exc, model)
                raise attach_usage(error, ledger.usage(error=str(error))) from None
            ledger.record(response.usage_metadata)
            echoed_model = response.model_version or echoed_model
            data, mime, width, height, seen = self._image_from(response, model, ledger)
            if seen > 1:
                warnings.append(f"gemini returned {seen} images for image {index}; kept the first")
            images.append(
                GeneratedImage(data=data, mime=mime, width=width, height=height, seed=seed, index=index)
            )
            ledger.images = len(images)
        return ImageResult(images=images, usage=ledger.usage(), model=echoed_model, warnings=warnings)

    @staticmethod
    def _config(
        request: ImageRequest, aspect: str, image_options: Mapping[str, Any], seed: int | None
    ) -> types.GenerateContentConfig:
        try:
            return types.GenerateContentConfig(
                response_modalities=["IMAGE"],
                candidate_count=1,
                seed=seed,
                image_config=types.ImageConfig(aspect_ratio=aspect, **image_options),
                # The SDK takes milliseconds; leaving retry_options unset keeps its retries off.
                http_options=types.HttpOptions(timeout=max(1, round(request.timeout_s * 1000))),
            )
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidRequest(f"gemini: bad image options ({problems})") from None

    def _image_from(
        self, response: types.GenerateContentResponse, model: str, ledger: _CallLedger
    ) -> tuple[bytes, str, int, int, int]:
        """The first final image of one response as (bytes, mime, width, height, image parts seen)."""
        found = [
            part.inline_data
            for candidate in response.candidates or []
            for part in (candidate.content.parts if candidate.content else None) or []
            # Gemini 3 models may send draft images as thought parts; only final parts count.
            if not part.thought and part.inline_data and part.inline_data.data
        ]
        if not found:
            error = self._no_image_error(response, model)
            raise attach_usage(error, ledger.usage(error=str(error)))
        blob = found[0]
        data = blob.data or b""
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                mime = blob.mime_type or Image.MIME.get(img.format or "", "image/png")
        except Exception:
            bad = NoImage(f"gemini model {model}: returned image bytes that do not decode")
            raise attach_usage(bad, ledger.usage(error=str(bad))) from None
        return data, mime, width, height, len(found)

    @staticmethod
    def _no_image_error(response: types.GenerateContentResponse, model: str) -> ImagenError:
        feedback = response.prompt_feedback
        block = _enum_value(feedback.block_reason) if feedback else None
        if block and block != "BLOCKED_REASON_UNSPECIFIED":
            detail = (
                f": {one_line(feedback.block_reason_message)}"
                if feedback and feedback.block_reason_message
                else ""
            )
            return ContentBlocked(
                f"gemini model {model}: prompt blocked by the safety system ({block}){detail}"
            )
        candidate = response.candidates[0] if response.candidates else None
        finish = _enum_value(candidate.finish_reason) if candidate else None
        message = one_line(candidate.finish_message) if candidate and candidate.finish_message else ""
        detail = f": {message}" if message else ""
        if finish in BLOCKING_FINISH_REASONS:
            return ContentBlocked(
                f"gemini model {model}: image blocked by the safety system ({finish}){detail}"
            )
        if finish == "NO_IMAGE":
            return NoImage(f"gemini model {model}: answered without an image (NO_IMAGE){detail}")
        reason = finish or "no candidates"
        return NoImage(f"gemini model {model}: returned no image ({reason}){detail}")

    def _translate(self, exc: Exception, model: str) -> ImagenError:
        """One SDK or transport exception -> the imagen error the pipeline keys on."""
        secret = self._secret()
        if isinstance(exc, ImagenError):
            return exc
        if isinstance(exc, genai_errors.APIError):
            return self._translate_api_error(exc, model, secret)
        if isinstance(exc, httpx2.TimeoutException):
            return ProviderTimeout(
                f"gemini model {model}: no answer within the timeout ({type(exc).__name__})"
            )
        if isinstance(exc, httpx2.TransportError):
            detail = one_line(_redact(str(exc), secret))
            return TransientError(f"gemini: connection failed ({type(exc).__name__}: {detail})")
        if isinstance(exc, genai_errors.UnknownApiResponseError):
            return TransientError(f"gemini: unreadable response ({one_line(_redact(str(exc), secret))})")
        try:
            from google.auth import exceptions as auth_exceptions
        except ImportError:  # pragma: no cover - google-auth ships with google-genai
            auth_exceptions = None  # type: ignore[assignment]
        if auth_exceptions is not None and isinstance(exc, auth_exceptions.GoogleAuthError):
            return AuthError(f"gemini (Vertex): credentials failed ({one_line(_redact(str(exc), secret))})")
        raise exc

    @staticmethod
    def _translate_api_error(exc: genai_errors.APIError, model: str, secret: str | None) -> ImagenError:
        code = exc.code
        status = exc.status or ""
        message = one_line(_redact(exc.message or "", secret))
        details = _error_details(exc.details)
        label = f"{code} {status}".strip()
        headers = getattr(exc.response, "headers", None)
        if code == 429:
            if _is_daily_or_free_tier_quota(details):
                return QuotaExhausted(f"gemini model {model}: quota exhausted ({label}): {message}")
            return RateLimited(
                f"gemini model {model}: rate limited ({label}): {message}",
                retry_after=_retry_delay(details, headers),
            )
        if code in TRANSIENT_CODES or code >= 500:
            return TransientError(
                f"gemini model {model}: provider error ({label}): {message}",
                retry_after=_retry_delay(details, headers),
            )
        if code in (401, 403) or _has_error_reason(details, "API_KEY_INVALID"):
            return AuthError(
                f"gemini: credentials rejected ({label}): {message}; check GEMINI_API_KEY/GOOGLE_API_KEY"
            )
        if code == 404:
            return InvalidRequest(f"gemini model {model!r} not found or retired ({label}): {message}")
        if code == 400 and _SAFETY_WORDS.search(message):
            return ContentBlocked(
                f"gemini model {model}: request refused by the safety system ({label}): {message}"
            )
        return InvalidRequest(f"gemini model {model}: request rejected ({label}): {message}")
