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
    """Retrying with backoff may help: rate limits, 5xx, timeouts, dropped connections."""

    is_transient = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequest(PermanentError):
    """The request (params, size, model, preset) is not acceptable."""


class UnknownName(InvalidRequest, ConfigError):
    """An unknown backend or preset: a job with it fails, and the CLI exits 78 (configuration)."""


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


class ProviderTimeout(TransientError):
    """The provider did not answer in time."""


class NotReachable(TransientError):
    """A server (PostgreSQL, Redis) did not answer: it may be back in a moment (CLI exit 75)."""


class SchemaNotReady(ConfigError):
    """The database lacks imagen's schema, or some of its migrations: run `imagen db migrate`."""


class StorageError(ImagenError):
    """Uploading or recording an image failed."""


class TransientStorageError(StorageError, TransientError):
    """A storage 5xx, 429 or connection failure."""
