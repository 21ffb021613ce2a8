"""The dashboard's own reads: capped counts, image rows, and the health view's figures.

Listing, showing, retrying and cancelling jobs go through `imagen.jobs_admin`
(what `imagen jobs` runs); this module holds only what the dashboard needs on
top, over the job store's operator reads (imagen/store/operator.sql, each
statement shaped to stay cheap on a table of millions of rows). It only reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from imagen import jobs_admin
from imagen.store.rows import ListenerSession as Listener
from imagen.store.rows import MinuteBucket

if TYPE_CHECKING:
    from imagen.store.operator import OperatorStore

# Counting a million done jobs exactly would scan a million index entries on every refresh;
# beyond this the page says "100,000+" (Oban Web and River UI cap their counts the same way).
# The cap lives in jobs_admin so that `imagen jobs watch` shares it without importing the web package.
COUNT_CAP = jobs_admin.COUNT_CAP


@dataclass(frozen=True)
class Health:
    """The health view: listeners, the queue in the database, and the last window."""

    listeners: list[Listener]
    last_claim: datetime | None
    pending: int
    oldest_pending_seconds: float | None
    running_by_stage: dict[str, int]
    window_seconds: float
    finished: dict[str, int]
    pickup_p50: float | None
    pickup_p95: float | None
    total_p50: float | None
    total_p95: float | None
    start: datetime | None = None
    minutes: list[MinuteBucket] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return sum(self.running_by_stage.values())

    @property
    def listeners_connected(self) -> int:
        return len(self.listeners)


def capped_counts(store: OperatorStore, cap: int = COUNT_CAP) -> dict[str, int]:
    """Jobs per status, each count stopped at `cap` (show `cap` as "cap+")."""
    return store.capped_counts(cap)


def image_row(store: OperatorStore, image_id: UUID) -> dict[str, Any] | None:
    return store.image_row(image_id)


def health(store: OperatorStore, window_seconds: float = 3600.0) -> Health:
    """Everything the health view shows that lives in PostgreSQL (Redis is `imagen.web.redis_queues`)."""
    window = store.finished_window(window_seconds, by_minute=True)
    whole = window.whole
    return Health(
        listeners=store.listener_sessions(),
        last_claim=store.last_claim(window_seconds),
        pending=store.pending_count(),
        oldest_pending_seconds=store.oldest_pending_seconds(),
        running_by_stage=jobs_admin.in_stage_order(store.running_by_stage()),
        window_seconds=window_seconds,
        finished={"done": whole.done, "failed": whole.failed, "cancelled": whole.cancelled},
        pickup_p50=whole.pickup_p50,
        pickup_p95=whole.pickup_p95,
        total_p50=whole.total_p50,
        total_p95=whole.total_p95,
        start=window.start,
        minutes=window.minutes,
    )


__all__ = ["COUNT_CAP", "Health", "Listener", "MinuteBucket", "capped_counts", "health", "image_row"]
