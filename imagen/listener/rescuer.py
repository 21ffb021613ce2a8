"""The rescuer (River's job_rescuer): expired leases back to pending, or failed at the maximum
attempts; then the sweep removes the image of jobs that ended failed or cancelled.

It works row by row (FOR UPDATE SKIP LOCKED in the store) and must never reset
running rows wholesale: other hosts' in-flight work lives in Redis. The sweep
is the one place the listener touches storage (the store's `sweep_ended`).
"""

from __future__ import annotations

import logging

from imagen.config import Settings
from imagen.errors import ImagenError
from imagen.listener.metrics import ListenerStats, Metrics
from imagen.logs import transition
from imagen.storage import Storage, open_storage
from imagen.store import JobStore, Rescued

log = logging.getLogger("imagen.listener")

SWEEP_BATCH = 100  # ended jobs a sweep visits per poll: each costs a storage call under its row lock


class Rescuer:
    """Rescues expired leases and sweeps the images of ended jobs, on every safety poll."""

    def __init__(self, settings: Settings, stats: ListenerStats, metrics: Metrics | None) -> None:
        self.settings = settings
        self.stats = stats
        self.metrics = metrics
        self._storage: Storage | None = None  # opened by the first sweep
        self._storage_error = ""

    def rescue(self, store: JobStore) -> list[Rescued]:
        """Expired leases back to pending (the caller claims them again) or failed at the maximum."""
        rescued = store.rescue_expired(
            lease_seconds=self.settings.lease_seconds, max_attempts=self.settings.max_attempts
        )
        for item in rescued:
            outcome = "failed" if item.status == "failed" else "requeued"
            if outcome == "failed":
                self.stats.gave_up += 1
            else:
                self.stats.rescued += 1
            if self.metrics:
                self.metrics.rescues.labels(outcome).inc()
            transition("rescued", item.job_id, item.attempt, None, outcome=outcome)
        return rescued

    def sweep(self, store: JobStore) -> int:
        """Remove the images row and object of jobs that ended failed or cancelled since the last sweep."""
        if self._storage is None:
            try:
                self._storage = open_storage(self.settings)
            except ImagenError as exc:
                if str(exc) != self._storage_error:  # once, not every poll
                    log.warning(
                        "sweep: cannot open storage (%s); images of ended jobs stay until it can", exc
                    )
                    self._storage_error = str(exc)
                return 0
        swept = len(store.sweep_ended(self._storage, limit=SWEEP_BATCH))
        self.stats.swept += swept
        if self.metrics and swept:
            self.metrics.swept.inc(swept)
        return swept
