"""Backend registry: a name from configuration or job params -> a backend instance.

Provider SDKs are imported only when their backend is asked for, so the mock
path (and the listener) never pay for them and work without the extras.
"""

from __future__ import annotations

from imagen.backends.base import Backend, GeneratedImage, ImageRequest, ImageResult, Usage
from imagen.config import Settings
from imagen.errors import ConfigError, UnknownName

BACKENDS = ("mock", "gemini", "openai")
ALIASES = {"google": "gemini"}


def canonical_name(name: str) -> str:
    """'google' and 'gemini' are the same backend; unknown names fail with the known list."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in BACKENDS:
        raise UnknownName(
            f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)} (google = gemini)"
        )
    return key


def get_backend(name: str, settings: Settings) -> Backend:
    """Build the backend called `name`, configured from `settings`."""
    key = canonical_name(name)
    if key == "mock":
        from imagen.backends.mock import MockBackend

        return MockBackend(call_log=settings.mock_call_log)
    try:
        if key == "gemini":
            from imagen.backends.gemini import GeminiBackend

            return GeminiBackend(settings)
        from imagen.backends.openai import OpenAIBackend

        return OpenAIBackend(settings)
    except ImportError as exc:
        raise ConfigError(
            f"the {key} backend needs its SDK: pip install 'imagen[{'google' if key == 'gemini' else key}]' ({exc})"
        ) from None


__all__ = ["BACKENDS", "Backend", "GeneratedImage", "ImageRequest", "ImageResult", "Usage", "get_backend"]
