"""Helpers the subcommands share: the prompt's checks, and --json's rounding of times."""

from __future__ import annotations

from typing import Any

import click


def check_prompt(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback for a job's prompt: blank or overlong is bad usage, worded as on every path."""
    from imagen.errors import InvalidRequest
    from imagen.params import check_prompt as check

    if value is None:
        return value
    try:
        return check(value)
    except InvalidRequest as exc:
        raise click.BadParameter(str(exc)) from None


def check_blank_prompt(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """`imagen generate`'s prompt: never blank (the providers, not a job row, bound its length)."""
    from imagen.params import BLANK_PROMPT

    if not value.strip():
        raise click.BadParameter(BLANK_PROMPT)
    return value


_SECONDS_KEYS = frozenset(
    {"since_previous", "since_created", "pickup_p50", "pickup_p95", "total_p50", "total_p95"}
)


def round_times(value: Any, unit: str | None = None) -> Any:
    """JSON output's times to 0.01 ms: milliseconds to 2 decimals, seconds to 5 (no float noise).

    The unit comes from the key: `*_ms` (and anything under such a key) is milliseconds,
    `*_seconds`, `*_s`, `seconds` and the stats' percentiles are seconds; rates get 3 decimals.
    """
    if isinstance(value, dict):
        if isinstance(value.get("unit"), str):  # a bench row: its figures are in its unit
            unit = "ms" if value["unit"] == "ms" else "rate"
        return {k: round_times(v, _unit_of(str(k)) or unit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [round_times(v, unit) for v in value]
    if isinstance(value, float) and unit is not None:
        return round(value, {"ms": 2, "s": 5, "rate": 3}[unit])
    return value


def _unit_of(key: str) -> str | None:
    if key.endswith("_ms"):
        return "ms"
    if key.endswith(("_seconds", "_s")) or key == "seconds" or key in _SECONDS_KEYS:
        return "s"
    if key in ("per_second", "ratio"):
        return "rate"
    return None
