"""The lease of jobs in a provider call, and when a stage's waits give up.

One thread per worker process (`Heartbeater`) keeps `heartbeat_at` fresh for every
job whose provider call is in progress, so a slow call is not mistaken for a
crash, but never for a stage past its time limit, so a thread that never comes
back is rescued by the lease. The same thread notices jobs cancelled or rescued
while in a call. `stop_check` turns that, the stage's time limit and a worker
shutdown into the reason a wait gives up (imagen.interrupts). It must never
refresh a job this attempt no longer holds: every write is fenced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imagen import interrupts
from imagen.store.base import JobStore

if TYPE_CHECKING:
    from imagen.stages.context import StageContext

log = logging.getLogger(__name__)

# How often the heartbeat thread asks whether jobs in a long call were cancelled or rescued:
# the bound on how long a cancelled job's call keeps its worker thread (docs/security.md).
CANCEL_CHECK_S = 1.0


@dataclass
class Beat:
    """One job's entry in the heartbeat thread: how many blocks hold it, and when its stage must end."""

    count: int
    started: float
    deadline: float
    # Set by the heartbeat thread when the job is no longer running at this attempt.
    gone: bool = False


class Heartbeater:
    """One thread per process keeps the lease of every job whose provider call is in progress.

    A slow provider call (minutes) must not look like a crash to the lease rescue, but a
    stage past its time limit must (so no heartbeat for it: the rescue takes the job back
    if the thread never returns). Every CANCEL_CHECK_S the thread also looks up the jobs
    that have been in a call longer than that, and marks the ones cancelled or rescued
    meanwhile, so their waits give up (imagen.interrupts). One shared thread and one
    statement per interval, not a thread per job: the mock backend finishes in a
    millisecond, and starting threads would cost more.
    """

    last_beat: float  # when the thread last refreshed leases; set when it starts

    def __init__(
        self,
        store: JobStore,
        lease_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], object] = time.sleep,
    ) -> None:
        """`clock` and `wait` are the thread's time: a test passes its own, so it decides when a pass runs."""
        self.store = store
        self.interval = max(0.5, lease_seconds / 4)
        self.check_interval = min(CANCEL_CHECK_S, self.interval)
        self.clock = clock
        self.wait = wait
        self.active: dict[tuple[str, int], Beat] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @contextmanager
    def beating(self, job_id: str, attempt: int, time_limit: float) -> Iterator[Beat]:
        key = (job_id, attempt)
        now = self.clock()
        with self.lock:
            beat = self.active.get(key)
            if beat is None:
                beat = self.active[key] = Beat(count=0, started=now, deadline=now + time_limit)
            beat.count += 1
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="imagen-heartbeat", daemon=True)
                self.thread.start()
        try:
            yield beat
        finally:
            with self.lock:
                beat.count -= 1
                if not beat.count:
                    self.active.pop(key, None)

    def _run(self) -> None:
        self.last_beat = self.clock()
        while True:
            self.wait(self.check_interval)
            self.check(self.clock())

    def check(self, now: float) -> None:
        """One pass of the thread: mark the jobs in a long call that this attempt no longer holds as
        gone, and once an interval has passed, refresh the lease of the others still in their time limit."""
        with self.lock:
            beats = list(self.active.items())
        if not beats:
            return
        try:
            long = [key for key, beat in beats if now - beat.started >= self.check_interval and not beat.gone]
            if long:
                held = self.store.still_running(long)
                for key, beat in beats:
                    if key in long and key not in held:
                        beat.gone = True
            if now - self.last_beat >= self.interval:
                self.last_beat = now
                keys = [key for key, beat in beats if beat.deadline > now and not beat.gone]
                if keys:
                    self.store.heartbeat_many(keys)
        except self.store.errors as exc:
            log.warning("heartbeat for %d job(s) failed; will retry: %s", len(beats), exc)


@contextmanager
def heartbeating(ctx: StageContext, job_id: str, attempt: int, time_limit: float) -> Iterator[Beat]:
    """Keep the job's lease fresh while the block runs, for at most `time_limit` seconds."""
    with ctx.heartbeater.beating(job_id, attempt, time_limit) as beat:
        yield beat


def stop_check(ctx: StageContext, beat: Beat) -> interrupts.StopCheck:
    """What makes a wait in the generation stage give up (imagen.interrupts)."""
    limit = ctx.settings.generate_time_limit
    clock = ctx.clock

    def check() -> BaseException | None:
        if ctx.stop_deadline is not None and clock() >= ctx.stop_deadline:
            return interrupts.CallAbandoned(
                "the worker stopped (SIGTERM) before the call ended; the job will be retried"
            )
        if beat.gone:
            return interrupts.JobGone("the job was cancelled or taken over while its call ran")
        if clock() >= beat.deadline:
            return interrupts.CallAbandoned(
                f"stopped at the stage's time limit ({limit:g} s, IMAGEN_GENERATE_TIME_LIMIT)"
            )
        return None

    return check


def own_limit(limit: float) -> float:
    """Our deadline for a stage, a little before Dramatiq's, so the error the job shows is ours."""
    return max(0.5 * limit, limit - 2.0)
