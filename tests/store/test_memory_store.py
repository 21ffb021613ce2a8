"""What only the in-memory store promises: a clock that never gives the same time twice, so the
order of its rows' timestamps is the order of its calls, as PostgreSQL's transactions order them."""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from uuid import UUID

import pytest

from imagen.store import InMemoryJobStore, memory_stages

STILL = datetime(2026, 1, 1, tzinfo=UTC)
OWNER = UUID("00000000-0000-4000-8000-0000000000a1")


class StillClock(datetime):
    """A wall clock that does not move between calls (a coarse clock, or two calls in one tick)."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> StillClock:
        return cls.fromtimestamp(STILL.timestamp(), tz)


def test_the_clock_moves_forward_even_when_the_wall_clock_stands_still(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory_stages, "datetime", StillClock)
    store = InMemoryJobStore()

    times = [store.now() for _ in range(3)]

    assert times[0] > STILL and times[0] < times[1] < times[2]
    first, second = store.submit_job(OWNER, "a", {}), store.submit_job(OWNER, "b", {})
    assert store.jobs[first]["created_at"] < store.jobs[second]["created_at"]
