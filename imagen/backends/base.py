"""The one small interface every provider backend implements: request -> images + usage.

No SDK type crosses this boundary: backends translate their provider's objects
and exceptions into these dataclasses and `imagen.errors` once, at the edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ImageRequest:
    """What to generate, after presets have been applied."""

    prompt: str
    negative_prompt: str | None = None
    n: int = 1
    size: tuple[int, int] | None = None
    aspect_ratio: str | None = None
    seed: int | None = None
    model: str | None = None
    # "low" | "medium" | "high" | "auto" ...: OpenAI's cost lever; None = the backend's configured default.
    quality: str | None = None
    timeout_s: float = 300.0
    options: Mapping[str, Any] = field(default_factory=dict)
    # The id imagen.usage will record this call under; a backend may pass it on as a request id.
    call_id: str | None = None


@dataclass(frozen=True)
class GeneratedImage:
    """One image as the provider returned it."""

    data: bytes
    mime: str
    width: int
    height: int
    seed: int | None = None
    index: int = 0


@dataclass(frozen=True)
class Usage:
    """One provider call's consumption, as the provider reported it."""

    backend: str
    model: str
    images: int = 0
    input_tokens: int | None = None
    output_tokens: int | None = None
    image_output_tokens: int | None = None
    thought_tokens: int | None = None
    latency_ms: float = 0.0
    ok: bool = True
    error: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageResult:
    """A successful call: its images, its usage and anything worth warning about."""

    images: list[GeneratedImage]
    usage: Usage
    model: str
    warnings: list[str] = field(default_factory=list)


class Backend(Protocol):
    """A provider. `generate` raises `TransientError` or `PermanentError` subclasses."""

    name: str

    def default_model(self) -> str:
        """The model used when the request names none."""
        ...

    def generate(self, request: ImageRequest) -> ImageResult:
        """Make the images; one provider call per image where the provider has no count."""
        ...
