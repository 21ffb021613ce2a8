"""The in-flight gate: how many jobs the claimer may take now, and how long to wait at the cap.

Plain arithmetic on the running count and a clock the caller passes in; no
database, no time of its own, so its rules are unit-tested directly. Before
each batch the claimer counts running jobs and asks `want`; at the cap it claims
again only once a refill's worth is free (an eighth of the cap, at most a
batch), and counts again after the time the pace jobs finish needs to free
that much (`wait`, between SATURATED_POLL and SATURATED_POLL_MAX, doubling while
nothing finishes). The pace is kept across refills, so on a steady backlog a
claim that fills the cap waits one refill's time and the next count finds room.
"""

from __future__ import annotations

SATURATED_POLL = 0.01  # the shortest wait between counts while the in-flight cap is reached
SATURATED_POLL_MAX = 0.25  # the longest, while nothing finishes


class InFlightGate:
    """The claimer's pacing at the in-flight cap; one per listener."""

    def __init__(self, max_in_flight: int, claim_batch: int) -> None:
        self.max_in_flight = max_in_flight
        self.claim_batch = claim_batch
        self.refill = max(1, min(claim_batch, max_in_flight // 8))
        self.saturated = False
        self.wait = SATURATED_POLL  # how long to wait before counting again while saturated
        self._room = 0
        self._last_count: tuple[float, int] | None = None  # (when, running) at the last count at the cap
        self._pace: float | None = None  # slots freed per second at the cap, from the last refill

    def want(self, running: int, now: float) -> int:
        """How many jobs to claim with `running` in flight; 0 means wait `self.wait` and count again.

        At the cap, a claim waits until a batch worth a round trip fits, not a job or two per tick.
        """
        room = self.max_in_flight - running
        if room <= 0 or (self.saturated and room < self.refill):
            self.saturated = True
            self.wait = self._refill_wait(running, room, now)
            return 0
        if self._last_count is not None:
            self._note_pace(running, now)
        self._last_count = None
        self._room = room
        return min(self.claim_batch, room)

    def claimed(self) -> None:
        """A claim ran (whatever it found): the next count decides again."""
        self.saturated = False

    def filled(self, want: int, now: float) -> bool:
        """After a whole batch of `want` was claimed and forwarded: True when that reached the cap.

        Then the claimer stops and counts again when the last pace has freed the next refill.
        """
        if want != self._room:
            return False
        self.saturated = True
        self.wait = self._wait_for(self.refill)
        self._last_count = (now, self.max_in_flight)
        return True

    def _refill_wait(self, running: int, room: int, now: float) -> float:
        """The time the pace since the last count needs to free a refill's worth, within the bounds.

        Each count is a scan of the running rows; a fixed 10 ms tick cost PostgreSQL a hundred of
        them a second for as long as the cap held, however slowly jobs finished. A refill that comes
        a little late costs nothing: the jobs already queued in Redis keep the workers busy meanwhile.
        """
        last = self._last_count
        if last is None:
            self._last_count = (now, running)
            return SATURATED_POLL
        if last[1] - running <= 0:  # nothing was claimed since that count, and nothing finished
            self._last_count = (now, running)
            return min(self.wait * 2, SATURATED_POLL_MAX)
        self._note_pace(running, now)
        return self._wait_for(self.refill - room)

    def _note_pace(self, running: int, now: float) -> None:
        """Slots freed per second since the last count at the cap; that count becomes this one."""
        assert self._last_count is not None
        last, self._last_count = self._last_count, (now, running)
        freed = last[1] - running
        if freed > 0:
            self._pace = freed / max(now - last[0], 1e-3)

    def _wait_for(self, slots: int) -> float:
        """The time `slots` take to free at the last pace seen, within the bounds; the shortest if unknown.

        Carried across refills, so a steady backlog costs one count per claim, not a count right
        after each claim (when almost nothing has finished yet) and another once a refill fits.
        """
        if self._pace is None:
            return SATURATED_POLL
        return min(max(slots / self._pace, SATURATED_POLL), SATURATED_POLL_MAX)
