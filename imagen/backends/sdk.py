"""What the SDK-backed backends share: a client built once on first use, a usage tally, error text.

A backend instance serves every thread of a worker process, so its SDK client
is built lazily (credentials are read then, and may fail with a readable
AuthError) and only once. Error text from a provider is folded to one bounded
line, and an error raised after calls that cost something carries their usage,
so the pipeline records the failed call. Nothing here knows a provider.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar

import httpx2

from imagen.backends.base import Usage
from imagen.errors import ImagenError, ProviderTimeout, RetriableProviderTimeout, TransientError

T = TypeVar("T")

MAX_MESSAGE = 300
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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


class CallLedger:
    """Token counts across the provider calls of one `generate`, so a failure can report what was spent.

    Each provider's subclass adds a `record` that reads its SDK's usage object and calls
    `add`; the Usage row (and the raw per-call counts) is built here the same way for all.
    """

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
        self.request_ids: list[str] = []

    @staticmethod
    def _sum(total: int | None, value: int | None) -> int | None:
        return total if value is None else (total or 0) + value

    def add(
        self,
        *,
        input_tokens: int | None,
        output_tokens: int | None,
        image_output_tokens: int | None,
        thought_tokens: int | None = None,
    ) -> None:
        """Add one response's counts; a count the provider did not report leaves the total as it is."""
        self.input_tokens = self._sum(self.input_tokens, input_tokens)
        self.output_tokens = self._sum(self.output_tokens, output_tokens)
        self.image_output_tokens = self._sum(self.image_output_tokens, image_output_tokens)
        self.thought_tokens = self._sum(self.thought_tokens, thought_tokens)

    def usage(self, *, error: str | None = None) -> Usage:
        raw: dict[str, Any] = {"calls": list(self.calls)}
        if self.request_ids:
            raw["request_ids"] = list(self.request_ids)
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
            raw=raw,
        )


def one_line(text: str | None) -> str:
    """Provider text as one line of at most MAX_MESSAGE characters."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= MAX_MESSAGE else flat[: MAX_MESSAGE - 1] + "…"


def attach_usage(error: ImagenError, usage: Usage) -> ImagenError:
    """Let the pipeline record a failed call: the error carries what the calls so far consumed."""
    carrier: Any = error
    carrier.usage = usage
    return error


def _duration(text: str) -> float | None:
    """'1s', '6m0s', '20ms', '1h2m3.5s' (OpenAI's x-ratelimit-reset-*) or a bare number -> seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def retry_after_from_headers(headers: Any) -> float | None:
    """Seconds to wait, from the headers of a 429 or 5xx, or None when they give no hint.

    `retry-after-ms` wins, then `retry-after` (seconds or an HTTP date), then
    OpenAI's `x-ratelimit-reset-requests`/`-tokens`: of those, the reset of a
    limit whose `x-ratelimit-remaining-*` is 0, or the later one when neither says.
    """
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        seconds = _duration(value)
        if seconds is not None:
            return max(0.0, seconds)
        try:
            return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
        except (TypeError, ValueError):
            pass
    resets = {}
    for limit in ("requests", "tokens"):
        reset = headers.get(f"x-ratelimit-reset-{limit}")
        seconds = _duration(reset) if reset is not None else None
        if seconds is not None:
            resets[limit] = seconds
    exhausted = [s for limit, s in resets.items() if headers.get(f"x-ratelimit-remaining-{limit}") == "0"]
    chosen = exhausted or list(resets.values())
    return max(chosen) if chosen else None


def timeout_error(provider: str, model: str, cause: BaseException | None, *, retry: bool) -> ImagenError:
    """A timeout as the pipeline should see it.

    Nothing was sent when connecting (or waiting for a pooled connection) timed
    out, so that is a plain TransientError. Any later timeout may have left the
    provider making, and billing, the image: a ProviderTimeout, not retried
    unless the operator opted in (IMAGEN_RETRY_TIMEOUTS=true).
    """
    if isinstance(cause, httpx2.ConnectTimeout | httpx2.PoolTimeout):
        return TransientError(f"{provider}: could not connect in time ({type(cause).__name__})")
    kind = type(cause).__name__ if cause is not None else "timeout"
    if retry:
        return RetriableProviderTimeout(
            f"{provider} model {model}: no answer within the timeout ({kind}); retrying, "
            "which may bill the image twice (IMAGEN_RETRY_TIMEOUTS=true)"
        )
    return ProviderTimeout(
        f"{provider} model {model}: no answer within the timeout ({kind}); not retried because the "
        "provider may still make and bill the image (raise IMAGEN_PROVIDER_TIMEOUT, or set "
        "IMAGEN_RETRY_TIMEOUTS=true to retry anyway)"
    )
