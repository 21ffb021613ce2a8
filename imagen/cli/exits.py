"""How a command ends: one line on stderr and an exit code (0 ok, 1 failed, 75 temporary, 78 config).

Subcommands import these from here, not from the `imagen.cli` package, so the
package (which registers the subcommands) and its commands form no import cycle.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

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
