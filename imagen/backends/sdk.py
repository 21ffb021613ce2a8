"""What the SDK-backed backends share: a client built once on first use, and their error text.

A backend instance serves every thread of a worker process, so its SDK client
is built lazily (credentials are read then, and may fail with a readable
AuthError) and only once. Error text from a provider is folded to one bounded
line, and an error raised after calls that cost something carries their usage,
so the pipeline records the failed call. Nothing here knows a provider.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from imagen.backends.base import Usage
from imagen.errors import ImagenError

T = TypeVar("T")

MAX_MESSAGE = 300


class LazyClient(Generic[T]):
    """An SDK client built by `build` on the first `get`, once, under a lock."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._client: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        with self._lock:
            if self._client is None:
                self._client = self._build()
            return self._client


def one_line(text: str | None) -> str:
    """Provider text as one line of at most MAX_MESSAGE characters."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= MAX_MESSAGE else flat[: MAX_MESSAGE - 1] + "…"


def attach_usage(error: ImagenError, usage: Usage) -> ImagenError:
    """Let the pipeline record a failed call: the error carries what the calls so far consumed."""
    carrier: Any = error
    carrier.usage = usage
    return error
