"""Owner quotas: how many images and how many dollars an owner may spend per UTC day.

Limits come from IMAGEN_OWNER_DAILY_IMAGES and IMAGEN_OWNER_DAILY_COST_USD (both
off by default), overridden per owner by rows in `imagen.owner_quotas`. Usage is
read from `imagen.usage`, the ledger every provider call writes, so a quota
counts what was really made and billed: images of successful calls and the
estimated cost of every call. The check runs before the provider call; a job
over quota fails with text its owner can act on and the provider is never
called. It must never write: refusing is the caller's business.

Calls of one owner that are checked at the same moment can each pass, so an
owner may overshoot by the calls already in flight; the next call is refused.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from imagen.errors import PermanentError

if TYPE_CHECKING:
    from imagen.store.operator import OperatorStore

# How long a worker trusts the overrides it read: an operator's change takes effect within this.
OVERRIDE_TTL_S = 30.0
# Up to this many override rows a worker reads all at once, every OVERRIDE_TTL_S; past it, the
# override of each owner it meets, when it meets it.
OVERRIDES_AT_ONCE = 10_000
# The per-owner reads' cache holds at most this many owners (then starts again).
OWNERS_CACHED = 10_000


class QuotaReads(Protocol):
    """The job store's two reads a quota check makes (imagen.store)."""

    def owner_quota(self, owner_user_id: UUID) -> tuple[int | None, float | None] | None: ...

    def owner_quotas(self, limit: int) -> dict[UUID, tuple[int | None, float | None]]: ...

    def used_today(self, owner_user_id: UUID) -> tuple[int, float]: ...


class QuotaReached(PermanentError):
    """The owner's daily quota is used up: retrying today cannot help."""

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Quota:
    """An owner's daily limits; None means no limit."""

    daily_images: int | None = None
    daily_cost_usd: float | None = None

    @property
    def is_limited(self) -> bool:
        return self.daily_images is not None or self.daily_cost_usd is not None


@dataclass(frozen=True)
class OwnerUsage:
    """One owner's usage since midnight UTC against its quota (`imagen jobs stats`)."""

    owner_user_id: UUID
    images: int
    cost_usd: float
    quota: Quota
    overridden: bool


def next_reset(now: datetime | None = None) -> datetime:
    """The next midnight UTC, when every daily quota starts again."""
    now = now or datetime.now(UTC)
    return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)


def _merge(default: Quota, images: Any, cost: Any) -> Quota:
    return Quota(
        daily_images=default.daily_images if images is None else int(images),
        daily_cost_usd=default.daily_cost_usd if cost is None else float(cost),
    )


class QuotaBook:
    """The quota check of one worker process: defaults from settings, overrides cached briefly.

    The overrides are read all at once, one statement every `ttl_s`, while there are at most
    `at_once` of them: looked up owner by owner, a backlog from 3,000 owners cost one more
    statement a job (`imagen bench --scale`). An operator with more overrides than that gets
    the per-owner reads, each cached for `ttl_s`, and memory bounded either way.
    """

    def __init__(
        self,
        daily_images: int | None,
        daily_cost_usd: float | None,
        *,
        ttl_s: float = OVERRIDE_TTL_S,
        at_once: int = OVERRIDES_AT_ONCE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = Quota(daily_images, daily_cost_usd)
        self.ttl_s = ttl_s
        self.at_once = at_once
        self.clock = clock
        self._overrides: dict[UUID, tuple[float, Any, Any]] = {}
        self._all: dict[UUID, tuple[int | None, float | None]] | None = None
        self._all_read: float | None = None
        self._lock = threading.Lock()

    def quota_for(self, store: QuotaReads, owner: UUID) -> Quota:
        """The owner's limits: its override row where a column is set, else the default."""
        every = self._all_overrides(store)
        if every is not None:
            return _merge(self.default, *every.get(owner, (None, None)))
        now = self.clock()
        with self._lock:
            cached = self._overrides.get(owner)
        if cached is None or now - cached[0] > self.ttl_s:
            row = store.owner_quota(owner)
            cached = (now, *(row or (None, None)))
            with self._lock:
                if len(self._overrides) > OWNERS_CACHED:
                    self._overrides.clear()
                self._overrides[owner] = cached
        return _merge(self.default, cached[1], cached[2])

    def _all_overrides(self, store: QuotaReads) -> dict[UUID, tuple[int | None, float | None]] | None:
        """Every override by owner, read again once `ttl_s` has passed; None when there are too many.

        One thread reads; the others go on with the overrides read before (or, before the first
        read has returned, with the per-owner reads). A failed read is tried again on the next check.
        """
        now = self.clock()
        with self._lock:
            if self._all_read is not None and now - self._all_read <= self.ttl_s:
                return self._all
            previous, self._all_read = self._all_read, now
        try:
            rows = store.owner_quotas(self.at_once + 1)
        except BaseException:
            with self._lock:
                self._all_read = previous
            raise
        every = rows if len(rows) <= self.at_once else None
        with self._lock:
            self._all = every
            if every is not None:
                self._overrides.clear()
        return every

    def check(self, store: QuotaReads, owner: UUID, images: int) -> None:
        """Raise QuotaReached when a call for `images` more images would pass the owner's quota today."""
        quota = self.quota_for(store, owner)
        if not quota.is_limited:
            return
        used_images, used_cost = store.used_today(owner)
        resets = "resets at 00:00 UTC"
        if quota.daily_images is not None and used_images + images > quota.daily_images:
            if used_images >= quota.daily_images:
                text = f"daily image quota of {quota.daily_images} reached; {resets}"
            else:
                text = (
                    f"daily image quota of {quota.daily_images} would be exceeded: {used_images} used today, "
                    f"this job asks for {images}; {resets}"
                )
            raise QuotaReached(text, kind="images")
        if quota.daily_cost_usd is not None and used_cost >= quota.daily_cost_usd:
            raise QuotaReached(
                f"daily cost quota of ${quota.daily_cost_usd:.2f} reached (${used_cost:.2f} used); {resets}",
                kind="cost",
            )


def owners_today(store: OperatorStore, default: Quota, *, limit: int = 50) -> list[OwnerUsage]:
    """Owners with usage since midnight UTC or an override, most spent first, with their quotas."""
    return [
        OwnerUsage(
            owner_user_id=day.owner_user_id,
            images=day.images,
            cost_usd=day.cost_usd,
            quota=_merge(default, day.daily_images, day.daily_cost_usd),
            overridden=day.overridden,
        )
        for day in store.owners_today(limit)
    ]
