"""How the Gemini backend reads a failure: API errors, quota details, and transports besides httpx2.

Split from gemini.py so the backend reads as the call it makes. Every message is
one line an owner can act on, never contains the key, and names the setting to
change where one would help (the API version, billing, the key's project).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from google.genai import errors as genai_errors

from imagen.backends.sdk import one_line, retry_after_from_headers, timeout_error
from imagen.errors import (
    AuthError,
    ContentBlocked,
    ImagenError,
    InvalidRequest,
    QuotaExhausted,
    RateLimited,
    TransientError,
)

TRANSIENT_CODES = frozenset({408, 500, 502, 503, 504})
_SAFETY_WORDS = re.compile(r"safety|prohibited|blocklist|responsible ai|content polic", re.IGNORECASE)
_UNKNOWN_FIELD = re.compile(r"Unknown name|Cannot find field|response ?modalit", re.IGNORECASE)
_KEY_LIKE = re.compile(r"AIza[0-9A-Za-z_\-]{10,}")


def redact(text: str, secret: str | None) -> str:
    """`text` without the key, nor anything shaped like a Google API key."""
    if secret:
        text = text.replace(secret, "***")
    return _KEY_LIKE.sub("***", text)


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


def _quota_violations(details: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [
        violation
        for detail in details
        for violation in detail.get("violations") or []
        if isinstance(violation, Mapping) and "quotaId" in violation
    ]


def _permanent_quota(details: list[Mapping[str, Any]], message: str) -> str | None:
    """Why a 429 cannot pass by waiting a minute, or None when it can.

    A per-day quota lasts until the day turns; a quota whose limit is 0 (a model
    the free tier does not include) never passes without billing. A free-tier
    per-minute quota with a real limit is an ordinary rate limit.
    """
    for violation in _quota_violations(details):
        quota_id = str(violation.get("quotaId", ""))
        if str(violation.get("quotaValue", "")).strip() == "0":
            return f"quota {quota_id} has a limit of 0 on this project (enable billing for this model)"
        if "PerDay" in quota_id:
            return f"daily quota {quota_id} is used up (it resets at midnight Pacific time)"
    if re.search(r"\blimit: 0\b", message):
        return "the quota's limit is 0 on this project (enable billing for this model)"
    return None


def _retry_delay(details: list[Mapping[str, Any]], headers: Any) -> float | None:
    """Seconds from google.rpc.RetryInfo.retryDelay, else from the response headers."""
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            delay = _parse_duration(detail.get("retryDelay"))
            if delay is not None:
                return delay
    return retry_after_from_headers(headers)


def _has_error_reason(details: list[Mapping[str, Any]], reason: str) -> bool:
    return any(d.get("reason") == reason for d in details)


def translate_other_transport(exc: Exception, model: str, detail: str, *, retry: bool) -> ImagenError | None:
    """Errors from the paths that do not use httpx2: Vertex token refresh (google-auth over
    requests) and the mTLS AuthorizedSession (requests). None when `exc` is none of those."""
    from google.auth import exceptions as auth_exceptions

    if isinstance(exc, auth_exceptions.TransportError | auth_exceptions.TimeoutError):
        # Reaching the token endpoint failed: the credentials may be fine.
        return TransientError(f"gemini (Vertex): could not refresh credentials ({detail})")
    if isinstance(exc, auth_exceptions.GoogleAuthError):
        if exc.retryable:
            return TransientError(f"gemini (Vertex): credentials refresh failed, retryable ({detail})")
        return AuthError(f"gemini (Vertex): credentials failed ({detail})")
    try:
        import requests
    except ImportError:  # pragma: no cover - google-auth's requests transport ships with google-genai
        requests = None  # type: ignore[assignment]
    if requests is not None:
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return TransientError(f"gemini: could not connect in time ({detail})")
        if isinstance(exc, requests.exceptions.Timeout):
            return timeout_error("gemini", model, exc, retry=retry)
        if isinstance(exc, requests.exceptions.RequestException):
            return TransientError(f"gemini: connection failed ({detail})")
    if isinstance(exc, TimeoutError):
        return timeout_error("gemini", model, exc, retry=retry)
    if isinstance(exc, ConnectionError):
        return TransientError(f"gemini: connection failed ({detail})")
    return None


def translate_api_error(
    exc: genai_errors.APIError, model: str, secret: str | None, version: str | None
) -> ImagenError:
    """One Gemini API error (an HTTP status with google.rpc details) -> an imagen error."""
    code = exc.code
    status = exc.status or ""
    message = one_line(redact(exc.message or "", secret))
    details = _error_details(exc.details)
    label = f"{code} {status}".strip()
    headers = getattr(exc.response, "headers", None)
    if code == 429:
        permanent = _permanent_quota(details, exc.message or "")
        if permanent:
            return QuotaExhausted(f"gemini model {model}: {permanent} ({label}): {message}")
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
            f"gemini: credentials rejected ({label}): {message}; check GEMINI_API_KEY/GOOGLE_API_KEY "
            "and that the Generative Language API is enabled for the key's project"
        )
    at = f" at API version {version}" if version else ""
    if code == 404:
        return InvalidRequest(
            f"gemini model {model!r} not found{at} ({label}): {message}; check the model id "
            "(IMAGEN_GEMINI_MODEL or params.model: it may be misspelt or retired) and "
            "GOOGLE_GENAI_API_VERSION (image models are served on v1beta, the default)"
        )
    if code == 400 and _SAFETY_WORDS.search(message):
        return ContentBlocked(
            f"gemini model {model}: request refused by the safety system ({label}): {message}"
        )
    if code == 400 and _UNKNOWN_FIELD.search(message):
        return InvalidRequest(
            f"gemini model {model}: the API{at} does not know a field imagen sends ({label}): {message}; "
            "unset GOOGLE_GENAI_API_VERSION or set it to v1beta"
        )
    return InvalidRequest(f"gemini model {model}: request rejected ({label}): {message}")
