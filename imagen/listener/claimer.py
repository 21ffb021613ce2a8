"""The claimer: claim pending jobs in fair batches and forward each batch to the generation queue.

A claim is committed before its messages are sent; a batch whose forward fails
is put back (the claim undone, the attempt not counted). The in-flight gate
decides how much to claim. It must never forward a job it did not claim.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from imagen.broker import GENERATE_ACTOR, GENERATE_QUEUE, stage_message
from imagen.listener.gate import InFlightGate
from imagen.listener.metrics import ListenerStats, Metrics
from imagen.logs import transition
from imagen.store import Claim, JobStore

log = logging.getLogger("imagen.listener")


class Claimer:
    """Drains the backlog into Redis, as far as the in-flight gate allows."""

    def __init__(
        self,
        broker: Any,
        gate: InFlightGate,
        stats: ListenerStats,
        metrics: Metrics | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.broker = broker
        self.clock = clock  # the gate's time: a test passes its own, never patches the process's
        self.gate = gate
        self.stats = stats
        self.metrics = metrics

    def drain(self, store: JobStore, stopping: Callable[[], bool]) -> int:
        """Claim and forward until no pending row is left or the in-flight cap is reached."""
        gate = self.gate
        total = 0
        while not stopping():
            if gate.saturated:
                want = gate.want(store.count_running(), self.clock())
                if not want:
                    break
                claims = store.claim_jobs(want)
            else:
                # Below the cap (an idle wake-up, a backlog's next batch): the in-flight count rides
                # in the claim, one round trip between the NOTIFY and the forward instead of two.
                claims, running = store.claim_within_cap(gate.claim_batch, gate.max_in_flight)
                if running is None:  # nothing claimed: drained, or at the cap
                    running = store.count_running()
                want = gate.want(running, self.clock())
                if not want:
                    break
            gate.claimed()
            if not claims:
                break
            total += len(claims)
            if not self.forward(store, claims):
                break
            if len(claims) < want:
                break  # the backlog is drained: the next claim waits for a notification or the poll
            if gate.filled(want, self.clock()):
                break
        return total

    def forward(self, store: JobStore, claims: list[Claim]) -> bool:
        """Send the batch to the generation queue in one round trip; on a broker failure put it back."""
        messages = [
            stage_message(GENERATE_ACTOR, GENERATE_QUEUE, str(claim.job_id), claim.attempt)
            for claim in claims
        ]
        try:
            self.broker.enqueue_many(messages)
        except Exception as exc:
            self.stats.forward_failures += len(claims)
            if self.metrics:
                self.metrics.forward_failures.inc(len(claims))
            log.warning(
                "forwarding to Dramatiq failed (%s): putting %d job(s) back", first_line(exc), len(claims)
            )
            for claim in claims:
                store.release_claim(claim.job_id, claim.attempt)
            return False
        for claim in claims:
            pickup = claim.pickup_seconds  # from the INSERT, or from when a retry or rescue made it pending
            self.stats.claims += 1
            if self.metrics:
                self.metrics.claims.inc()
                self.metrics.pickup.observe(max(pickup, 0.0))
            transition("claimed", claim.job_id, claim.attempt, "queued", pickup_ms=round(pickup * 1000, 2))
        return True


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
