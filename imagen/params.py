"""Job params: the `params` jsonb of imagen.jobs, validated into a typed spec.

The UI writes params directly, so this is the gate between arbitrary JSON and
the pipeline: unknown or ill-typed keys fail the job with a message the owner
can act on, and nothing in params ever reaches a file or object path.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from imagen.backends import canonical_name
from imagen.backends.sizes import parse_aspect, parse_size
from imagen.errors import InvalidRequest

if TYPE_CHECKING:
    from imagen.job_policy import JobPolicy

MAX_PROMPT = 4000  # characters, as the jobs_prompt_check constraint allows
BLANK_PROMPT = "the prompt must not be blank"

MAX_SEED = 2**31 - 1
MAX_NEGATIVE = 2000
MAX_DELAY_MS = 600_000
MOCK_ONLY = ("delay_ms", "fail")
KNOWN = (
    "backend",
    "model",
    "size",
    "aspect_ratio",
    "preset",
    "seed",
    "negative_prompt",
    "quality",
    *MOCK_ONLY,
)
# OpenAI's image quality (its main cost lever); other backends ignore it with a warning.
QUALITIES = ("auto", "low", "medium", "high", "xhigh", "max")
MAX_SHOWN = 40
MAX_SHOWN_KEYS = 5


@dataclass(frozen=True)
class GenerateSpec:
    """Everything `pipeline.generate` needs besides configuration; built by the CLI or from a job."""

    prompt: str
    backend: str | None = None
    model: str | None = None
    n: int = 1
    size: tuple[int, int] | None = None
    aspect_ratio: str | None = None
    preset: str | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    quality: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


def _shown(text: str) -> str:
    """A user's text as an error shows it: one line (non-printables escaped), at most MAX_SHOWN characters."""
    shown = text if text.isprintable() else repr(text)[1:-1]
    return shown if len(shown) <= MAX_SHOWN else shown[: MAX_SHOWN - 1] + "…"


def _string(params: Mapping[str, Any], key: str, max_len: int = 200) -> str | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"params.{key} must be a string, not {type(value).__name__}")
    value = value.strip()
    if not value:
        raise InvalidRequest(f"params.{key} must not be empty")
    if len(value) > max_len:
        raise InvalidRequest(f"params.{key} is too long ({len(value)} characters, at most {max_len})")
    return value


def _integer(params: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    # JSON has one number type: accept 42 and 42.0, refuse 4.5, true and "42".
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"params.{key} must be an integer, not {type(value).__name__}")
    if isinstance(value, float) and not value.is_integer():
        raise InvalidRequest(f"params.{key} must be an integer, not {value}")
    number = int(value)
    if not low <= number <= high:
        # str() of an int over 4300 digits raises ValueError; JSON numbers have no such bound.
        shown = str(number) if number.bit_length() <= 64 else f"a {number.bit_length()}-bit number"
        raise InvalidRequest(f"params.{key} must be between {low} and {high}, not {shown}")
    return number


def check_prompt(prompt: object) -> str:
    """The prompt, or InvalidRequest with the one wording every path uses (CLI, jobs, the database's check)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequest(BLANK_PROMPT)
    if len(prompt) > MAX_PROMPT:
        raise InvalidRequest(f"the prompt is {len(prompt)} characters long; at most {MAX_PROMPT} are allowed")
    return prompt


def spec_from_params(prompt: str, params: Any, policy: JobPolicy | None = None) -> GenerateSpec:
    """Validate a job's prompt and params; raise InvalidRequest naming the first problem.

    With the operator's `policy` (the stages pass it), errors list only what the policy
    allows, and the mock's test options and backends it does not offer are refused
    here; `job_policy.check_generation` checks the rest once presets are applied.
    """
    check_prompt(prompt)
    if not isinstance(params, Mapping):
        raise InvalidRequest(f"params must be a JSON object, not {type(params).__name__}")
    allowed = policy.allowed_keys(KNOWN) if policy is not None else KNOWN
    unknown = sorted(str(k) for k in params if k not in KNOWN)
    if unknown:
        named = ", ".join(_shown(key) for key in unknown[:MAX_SHOWN_KEYS])
        more = f" and {len(unknown) - MAX_SHOWN_KEYS} more" if len(unknown) > MAX_SHOWN_KEYS else ""
        raise InvalidRequest(f"unknown params key(s): {named}{more}; allowed: {', '.join(allowed)}")
    if policy is not None:
        policy.check_keys(params)
    backend = _string(params, "backend", 40)
    if backend is not None:
        backend = policy.check_backend(backend) if policy is not None else canonical_name(backend)
    size_text = _string(params, "size", 20)
    aspect = _string(params, "aspect_ratio", 10)
    if size_text and aspect:
        raise InvalidRequest("give params.size or params.aspect_ratio, not both")
    size = parse_size(size_text) if size_text else None
    if aspect:
        parse_aspect(aspect)
    quality = _string(params, "quality", 10)
    if quality is not None and quality not in QUALITIES:
        choices = policy.quality_choices() if policy is not None else QUALITIES
        raise InvalidRequest(f"params.quality must be one of {', '.join(choices)}, not {_shown(quality)!r}")
    options: dict[str, Any] = {}
    delay = _integer(params, "delay_ms", 0, MAX_DELAY_MS)
    if delay is not None:
        options["delay_ms"] = delay
    fail = params.get("fail")
    if fail is not None:
        if fail not in ("transient", "permanent"):
            shown = _shown(repr(fail)) if isinstance(fail, str) else f"a {type(fail).__name__}"
            raise InvalidRequest(f"params.fail must be 'transient' or 'permanent', not {shown}")
        options["fail"] = fail
    if options and backend not in (None, "mock"):
        raise InvalidRequest(f"params {', '.join(sorted(options))} only apply to the mock backend")
    return GenerateSpec(
        prompt=prompt.strip(),
        backend=backend,
        model=_string(params, "model", 100),
        size=size,
        aspect_ratio=aspect,
        preset=_string(params, "preset", 60),
        seed=_integer(params, "seed", 0, MAX_SEED),
        negative_prompt=_string(params, "negative_prompt", MAX_NEGATIVE),
        quality=quality,
        options=options,
    )


def load_params(params_json: str) -> Any:
    """A job's params from their jsonb text.

    PostgreSQL accepts jsonb that Python's json cannot load (nesting deeper than the
    recursion limit, integers over 4300 digits); that is the owner's input, not a
    transient failure, so it is an InvalidRequest.
    """
    try:
        return json.loads(params_json)
    except (RecursionError, ValueError):
        raise InvalidRequest("params cannot be read: nested too deeply or a number too long") from None
