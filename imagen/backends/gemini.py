"""The Gemini backend: Gemini image models through google-genai `generate_content`.

One provider call per image (the API has no count parameter), each with
`response_modalities=["IMAGE"]` and an `ImageConfig` aspect ratio. The SDK's own
retries stay off: the pipeline owns the one retry policy, so this module only
translates every outcome into `imagen.errors` once (the rules for error responses
and transports are in gemini_errors.py). A 200 without an image is a
failure (blocked or no image), never a success. It must never put the API key
into an error, a log line or a usage record.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import httpx2
import pydantic
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image

from imagen.backends.base import GeneratedImage, ImageRequest, ImageResult
from imagen.backends.gemini_errors import redact, translate_api_error, translate_other_transport
from imagen.backends.sdk import CallLedger, LazyClient, attach_usage, one_line, timeout_error
from imagen.backends.sizes import GEMINI_ASPECTS, nearest_aspect, parse_aspect, size_rule
from imagen.config import Settings
from imagen.errors import (
    AuthError,
    ContentBlocked,
    ImagenError,
    InvalidRequest,
    NoImage,
    TransientError,
)

# The ratios every Gemini image model takes; some take more (sizes.size_rule knows which).
ASPECT_RATIOS = GEMINI_ASPECTS
DEFAULT_ASPECT = "1:1"
# Options passed through to ImageConfig; everything else in request.options earns a warning.
IMAGE_CONFIG_OPTIONS = ("image_size", "person_generation")
# ImageConfig fields the Gemini Developer API (API-key mode) refuses; Vertex takes them.
VERTEX_ONLY_OPTIONS = ("person_generation",)
# With an API key the SDK's default version is v1, but Google documents image output on v1beta.
DEFAULT_API_VERSION = "v1beta"

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


def nearest_aspect_ratio(width: int, height: int, aspects: tuple[str, ...] = ASPECT_RATIOS) -> str:
    """The supported ratio closest to width:height (compared on a log scale, so 2:1 and 1:2 are symmetric)."""
    return nearest_aspect(width, height, aspects)


def choose_aspect_ratio(request: ImageRequest, model: str | None = None) -> tuple[str, list[str]]:
    """The aspect ratio to send, plus warnings when the request cannot be honoured exactly.

    Gemini picks the pixel size itself (about 1K on the long side unless `image_size`
    says otherwise), so an explicit size is always approximated by its nearest ratio.
    """
    aspects = size_rule("gemini", model).aspects if model else ASPECT_RATIOS
    warnings: list[str] = []
    if request.size:
        width, height = request.size
        ratio = nearest_aspect_ratio(width, height, aspects)
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
        if canonical in aspects:
            return canonical, warnings
        ratio = nearest_aspect_ratio(w, h, aspects)
        warnings.append(
            f"gemini does not support aspect ratio {request.aspect_ratio}; using the nearest, {ratio}"
        )
        return ratio, warnings
    return DEFAULT_ASPECT, warnings


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
    """The API version to pin; None leaves Vertex on the SDK's default (v1beta1)."""
    # GOOGLE_GENAI_API_VERSION=beta is the SDK's shorthand for the beta path of either API.
    if configured == "beta":
        return "v1beta1" if vertex else "v1beta"
    if configured:
        return configured
    return None if vertex else DEFAULT_API_VERSION


def _final_images(response: types.GenerateContentResponse) -> list[types.Blob]:
    """The image parts of a response; Gemini 3 models may send draft images as thought parts, skipped."""
    return [
        part.inline_data
        for candidate in response.candidates or []
        for part in (candidate.content.parts if candidate.content else None) or []
        if not part.thought and part.inline_data and part.inline_data.data
    ]


class _CallLedger(CallLedger):
    """Token counts across the calls of one `generate`, so a failure can report what was spent."""

    def record(self, metadata: types.GenerateContentResponseUsageMetadata | None, *, imaged: bool) -> None:
        """Add one response's counts; `imaged` says whether it carried an image."""
        if metadata is None:
            self.calls.append({})
            return
        self.calls.append(metadata.model_dump(mode="json", exclude_none=True, by_alias=True))
        image_tokens = None
        for detail in metadata.candidates_tokens_details or []:
            if _enum_value(detail.modality) == "IMAGE":
                image_tokens = (image_tokens or 0) + (detail.token_count or 0)
        if not metadata.candidates_tokens_details and imaged:
            # No per-modality breakdown: with response_modalities=["IMAGE"] and an image returned,
            # every candidate token is an image token (thinking is counted apart, in thoughts_token_count).
            image_tokens = metadata.candidates_token_count
        self.add(
            input_tokens=metadata.prompt_token_count,
            output_tokens=metadata.candidates_token_count,
            image_output_tokens=image_tokens,
            thought_tokens=metadata.thoughts_token_count,
        )


class GeminiBackend:
    """Gemini image models via `generate_content`, with an API key or Vertex credentials."""

    name = "gemini"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client = LazyClient(self._build_client)
        self._vertex = False
        self._api_version: str | None = None

    def default_model(self) -> str:
        return self._settings.gemini_model

    def _secret(self) -> str | None:
        key = self._settings.gemini_api_key
        return key.get_secret_value() if key else None

    def _build_client(self) -> genai.Client:
        vertex = vertex_enabled()
        self._vertex = vertex
        self._api_version = _api_version(self._settings.gemini_api_version, vertex=vertex)
        http_options = types.HttpOptions(
            base_url=self._settings.gemini_base_url or None, api_version=self._api_version
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
                f"for express mode ({one_line(redact(str(exc), self._secret()))})"
            ) from None

    def generate(self, request: ImageRequest) -> ImageResult:
        """Make `request.n` images, one `generate_content` call each (seed + i when seeded)."""
        model = request.model or self.default_model()
        aspect, warnings = choose_aspect_ratio(request, model)
        if request.negative_prompt:
            warnings.append("gemini has no negative prompt; negative_prompt was ignored")
        if request.quality:
            warnings.append("gemini has no quality setting; quality was ignored")
        image_options = {k: request.options[k] for k in IMAGE_CONFIG_OPTIONS if k in request.options}
        warnings.extend(
            f"gemini ignores option {key!r}" for key in request.options if key not in IMAGE_CONFIG_OPTIONS
        )
        client = self._client.get()
        refused = [k for k in VERTEX_ONLY_OPTIONS if k in image_options and not self._vertex]
        if refused:
            raise InvalidRequest(
                f"gemini: {', '.join(refused)} works only with Vertex AI (GOOGLE_GENAI_USE_ENTERPRISE=true), "
                "not with a Gemini API key"
            )
        ledger = _CallLedger(self.name, model)
        images: list[GeneratedImage] = []
        echoed_model = model
        for index in range(request.n):
            seed = request.seed + index if request.seed is not None else None
            config = self._config(request, aspect, image_options, seed)
            try:
                response = client.models.generate_content(model=model, contents=request.prompt, config=config)
            except Exception as exc:
                error = self.translate(exc, model)
                raise attach_usage(error, ledger.usage(error=str(error))) from None
            ledger.record(response.usage_metadata, imaged=bool(_final_images(response)))
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
        found = _final_images(response)
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

    def translate(self, exc: Exception, model: str) -> ImagenError:
        """One SDK, auth or transport exception -> the imagen error the pipeline keys on."""
        secret = self._secret()
        if isinstance(exc, ImagenError):
            return exc
        if isinstance(exc, genai_errors.APIError):
            return translate_api_error(exc, model, secret, self._api_version)
        detail = one_line(redact(f"{type(exc).__name__}: {exc}", secret))
        if isinstance(exc, httpx2.TimeoutException):
            return timeout_error("gemini", model, exc, retry=self._settings.retry_timeouts)
        if isinstance(exc, httpx2.TransportError):
            return TransientError(f"gemini: connection failed ({detail})")
        if isinstance(exc, genai_errors.UnknownApiResponseError):
            return TransientError(f"gemini: unreadable response ({detail})")
        translated = translate_other_transport(exc, model, detail, retry=self._settings.retry_timeouts)
        if translated is not None:
            return translated
        if isinstance(exc, ValueError):
            # The SDK checks a request while building it (an option this API mode lacks) with ValueError.
            return InvalidRequest(f"gemini model {model}: request refused by the SDK ({detail})")
        raise exc
