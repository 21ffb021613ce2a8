"""The `imagen` command: parse, call, print. The work lives in importable modules.

Exit codes: 0 ok; 1 the work failed (a permanent error, a job that did not end
done); 2 bad usage; 75 a transient failure that outlasted its retries (a server
that does not answer); 78 bad configuration (an unknown database or role, a
malformed URL, a schema never migrated, a missing key, an unknown backend or
preset). Errors print as one line on stderr, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from imagen import __version__
from imagen.errors import ConfigError, ImagenError, NotReachable, TransientError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78


def fail(message: str, code: int = EXIT_FAILED) -> None:
    """Print one line on stderr and exit."""
    click.echo(f"imagen: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Turn imagen's errors into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                raise _translate(exc) from None
        except ConfigError as exc:
            fail(str(exc), EXIT_CONFIG)
        except TransientError as exc:
            fail(f"{exc} (temporary failure; try again later)", EXIT_TEMPFAIL)
        except ImagenError as exc:
            fail(str(exc), EXIT_FAILED)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


def _translate(exc: Exception) -> Exception:
    """Servers that are down or misconfigured are an operator's problem, not a bug: one typed line."""
    kind = type(exc).__module__.split(".")[0]
    if kind == "psycopg":
        from imagen.db import describe_error

        return describe_error(exc)  # type: ignore[arg-type]
    if kind == "redis":
        from redis.exceptions import ConnectionError, TimeoutError

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, ConnectionError | TimeoutError):
            return NotReachable(f"redis error: {first}")
        return ImagenError(f"redis error: {first}")
    return exc


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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="imagen")
def main() -> None:
    """imagen: turn prompts, and rows in imagen.jobs, into generated images.

    Configuration comes from IMAGEN_* environment variables and a .env file in
    the current directory (see .env.example). Exit codes: 0 ok, 1 failed,
    2 bad usage, 75 temporary failure, 78 bad configuration.
    """


def _register() -> None:
    from imagen.cli import bench, db, generate, jobs, pipeline, presets, web

    main.add_command(generate.generate)
    main.add_command(db.db)
    main.add_command(jobs.jobs)
    main.add_command(pipeline.listen)
    main.add_command(pipeline.smoke)
    main.add_command(pipeline.demo)
    main.add_command(bench.bench)
    main.add_command(presets.presets)
    main.add_command(web.web)


_register()
