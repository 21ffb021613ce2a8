"""Waiting on conditions with deadlines: the only way tests wait."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.01, message: str = ""
) -> T:
    """Poll `condition` until it returns a truthy value, or fail with `message` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: T = condition()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {message or condition}")
        time.sleep(interval)
        last = condition()
    return last
