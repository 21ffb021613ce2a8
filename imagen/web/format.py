"""Jinja filters: durations, times and counts the way an operator reads them at a glance."""

from __future__ import annotations

from datetime import UTC, datetime

from imagen import jobs_admin
from imagen.web.queries import COUNT_CAP


def duration(seconds: float | None) -> str:
    """'-', '850 ms', '2.4 s', '3m05s', '4h10m', '2d03h'."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{max(seconds, 0) * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def when(moment: datetime | None) -> str:
    """UTC, to the millisecond, as `imagen jobs show` prints it."""
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def short(text: str | None, width: int = 80) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def count(n: int) -> str:
    """A capped count: '100,000+' at the cap."""
    return jobs_admin.capped_count(n, COUNT_CAP)
