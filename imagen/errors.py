"""The small exception hierarchy every layer raises and the pipeline keys on.

Edges (providers, storage, database) translate their own exceptions into these
once; the actors only ask `is_transient`. Messages must be readable by the job's
owner and must never contain secrets.
"""

from __future__ import annotations


class ImagenError(Exception):
    """Base of every error imagen raises on purpose."""

    is_transient: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ImagenError):
    """A missing or malformed setting: the operator must fix the environment."""


class PermanentError(ImagenError):
    """Retrying cannot help: bad params, refused prompt, bad credentials."""


class TransientError(ImagenError):
    """Retrying with backoff may help: rate limits, 5xx, dropped connections.

    `retry_after` is the provider's own hint, in seconds from when the error was
    raised, of when a retry can succeed, or None when it gave none. Backends fill
    it from Gemini's `google.rpc.RetryInfo.retryDelay`, OpenAI's `retry-after-ms`
    and `retry-after` headers (seconds or an HTTP date) and, failing those, the
    `x-ratelimit-reset-requests`/`-tokens` header of the exhausted limit. Callers
    that schedule retries (the CLI, the stages, admission) should wait at least
    this long; it is a plain float so they need no provider knowledge.
    """

    is_transient = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequest(PermanentError):
    """The request (params, size, model, preset) is not acceptable."""


class UnknownName(InvalidRequest, ConfigError):
    """An unknown backend or preset: a job with it fails, and the CLI exits 78 (configuration)."""


class BadPresetsFile(InvalidRequest, ConfigError):
    """IMAGEN_PRESETS_FILE is missing, unreadable or malformed: the CLI exits 78, workers refuse to start."""


class ContentBlocked(PermanentError):
    """The provider's safety system refused the prompt or the output."""


class NoImage(PermanentError):
    """The provider answered successfully but returned no image."""


class AuthError(PermanentError, ConfigError):
    """Credentials are missing, wrong or lack permission: the operator must fix a key (CLI exit 78)."""


class QuotaExhausted(PermanentError):
    """A daily or billing quota is used up; retrying now would only fail again."""


class RateLimited(TransientError):
    """A per-minute rate limit: wait and retry."""


class ProviderTimeout(PermanentError):
    """The provider did not answer in time, after the request was sent.

    Not retried by default: the provider may still finish (and bill) the image
    it was asked for, and neither provider offers an idempotency key, so a retry
    can pay twice. IMAGEN_RETRY_TIMEOUTS=true makes backends raise
    `RetriableProviderTimeout` instead. A connect timeout (nothing was sent) is
    a plain TransientError.
    """


class RetriableProviderTimeout(ProviderTimeout, TransientError):
    """A provider timeout the operator chose to retry (IMAGEN_RETRY_TIMEOUTS=true)."""

    is_transient = True


class NotReachable(TransientError):
    """A server (PostgreSQL, Redis) did not answer: it may be back in a moment (CLI exit 75)."""


class SchemaNotReady(ConfigError):
    """The database lacks imagen's schema, or some of its migrations: run `imagen db migrate`."""


class StorageError(ImagenError):
    """Uploading or recording an image failed."""


class TransientStorageError(StorageError, TransientError):
    """A storage 5xx, 429 or connection failure."""
