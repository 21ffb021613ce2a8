"""The listener service: wake on LISTEN or the safety poll, drain, rescue, sweep; reconnect on loss.

It wires the parts, each in its own module with one job: the notifier's LISTEN
connection (`imagen.store.notify`), the claimer (`claimer.py`) paced by the
in-flight gate (`gate.py`), and the rescuer with the image sweep (`rescuer.py`).
Notifications only wake it: on every wake it drains the whole backlog, so a
lost notification costs at most one safety poll. It reaches the database only
through the store, and never imports the actors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from imagen.broker import build_broker
from imagen.config import Settings
from imagen.db import describe_error
from imagen.errors import ConfigError
from imagen.listener.claimer import Claimer, first_line
from imagen.listener.gate import InFlightGate
from imagen.listener.metrics import ListenerStats, Metrics
from imagen.listener.rescuer import Rescuer
from imagen.store import JobStore, Rescued
from imagen.store.notify import CHANNEL, CONNECTION_LOST, PostgresNotifier, SessionJobStore

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("imagen.listener")

HEALTH_INTERVAL = 10.0
MAX_BACKOFF = 5.0

__all__ = ["CHANNEL", "Listener", "ListenerStats", "Notifier", "run_listener"]


class Notifier(Protocol):
    """What the loop needs of its LISTEN connection (`PostgresNotifier`; a fake in unit tests)."""

    def wait(self, timeout: float) -> bool: ...

    def check(self) -> None: ...

    def close(self) -> None: ...


class Listener:
    """Claims pending jobs and forwards them; `run()` blocks until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        broker: Any = None,
        metrics_port: int | None = None,
        on_event: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        open_notifier: Callable[[], Notifier] | None = None,
        open_store: Callable[[], JobStore] | None = None,
        pause: Callable[[float], object] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """The seams are for unit tests, which run the loop without a server or real time.

        `clock` is the listener's monotonic time: the poll and health deadlines and the claimer's
        pace at the in-flight cap. `open_notifier` and `open_store` open the LISTEN session and the
        claims' session (PostgreSQL by default); `pause` waits out a reconnect's backoff (by default
        on the stop event, so a stop cuts it short); `registry` holds the Prometheus metrics.
        """
        self.settings = settings
        self.stats = ListenerStats()
        self.on_event = on_event or (lambda event: None)
        self.clock = clock
        self._stopping = threading.Event()
        if open_notifier is None or open_store is None:
            url = settings.require_database_url()
            open_notifier = open_notifier or (lambda: PostgresNotifier(url))
            open_store = open_store or (lambda: SessionJobStore(url, "imagen-listener-claims"))
        self._open_notifier = open_notifier
        self._open_store = open_store
        self._pause = pause or self._stopping.wait
        self._notifier: Notifier | None = None
        self._store: JobStore | None = None
        self.gate = InFlightGate(settings.max_in_flight, settings.claim_batch)
        port = settings.listener_metrics_port if metrics_port is None else metrics_port
        self.metrics = Metrics(port, settings.metrics_addr, registry=registry) if port else None
        self.claimer = Claimer(
            broker or build_broker(settings), self.gate, self.stats, self.metrics, clock=clock
        )
        self.rescuer = Rescuer(settings, self.stats, self.metrics)

    def stop(self) -> None:
        """Stop claiming; the forward in hand finishes, then `run` returns."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _set_mode(self, mode: str) -> None:
        if self.stats.mode != mode:
            log.info("listener mode: %s", mode)
        self.stats.mode = mode
        if self.metrics:
            self.metrics.set_mode(mode)
        self.on_event(mode)

    def _connect(self) -> None:
        self._close()
        self._notifier = self._open_notifier()  # LISTEN first: see PostgresNotifier
        self._store = self._open_store()

    def _close(self) -> None:
        if self._notifier is not None:
            self._notifier.close()
        if self._store is not None:
            self._store.close()
        self._notifier = self._store = None

    def run(self) -> None:
        """Listen, drain and rescue until stopped; reconnect with backoff on connection loss."""
        backoff = 0.05
        log.info(
            "listener starting: poll every %ss, lease %ss, max attempts %s, batch %s, in-flight cap %s",
            self.settings.poll_interval, self.settings.lease_seconds, self.settings.max_attempts,
            self.settings.claim_batch, self.settings.max_in_flight,
        )  # fmt: skip
        connected = False
        while not self.stopping:
            try:
                self._connect()
                connected = True
                self._set_mode("listening")
                backoff = 0.05
                self.drain()
                self.rescue()
                self.sweep()
                self._loop()
            except CONNECTION_LOST as exc:
                if self.stopping:
                    break
                problem = describe_error(exc)  # type: ignore[arg-type]
                if isinstance(problem, ConfigError):
                    self._close()
                    raise problem from None  # a wrong database, role or password: retrying cannot help
                self.stats.reconnects += 1
                if self.metrics:
                    self.metrics.reconnects.inc()
                self._set_mode("reconnecting")
                if connected:
                    log.warning(
                        "listener lost its database connection (%s); reconnecting in %.2fs",
                        first_line(exc),
                        backoff,
                    )
                else:
                    log.warning(
                        "listener cannot connect to the database (%s); trying again in %.2fs",
                        first_line(exc),
                        backoff,
                    )
                self._pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except ConfigError:
                self._close()
                raise
        self._set_mode("stopping")
        self._close()
        log.info("listener stopped")

    def _loop(self) -> None:
        poll = self.settings.poll_interval
        next_poll = self.clock() + poll
        next_health = self.clock() + HEALTH_INTERVAL
        while not self.stopping:
            now = self.clock()
            deadline = min(next_poll, next_health)
            if self.gate.saturated:
                deadline = min(deadline, now + self.gate.wait)
            notified = self._wait(max(0.0, deadline - now))
            if self.stopping:
                return
            now = self.clock()
            if notified or now >= next_poll or self.gate.saturated:
                self.drain()
            if now >= next_poll:
                self.rescue()
                self.sweep()
                next_poll = now + poll
            if now >= next_health:
                assert self._notifier is not None
                self._notifier.check()
                next_health = now + HEALTH_INTERVAL

    def _wait(self, timeout: float) -> bool:
        """Block until a notification arrives, the timeout passes or stop is asked (in short slices)."""
        notifier = self._notifier
        assert notifier is not None
        deadline = self.clock() + timeout
        while not self.stopping:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            if notifier.wait(min(remaining, 0.25)):
                return True
        return False

    def drain(self) -> int:
        """Claim and forward until no pending row is left or the in-flight cap is reached."""
        assert self._store is not None
        total = self.claimer.drain(self._store, lambda: self.stopping)
        if total:
            self.on_event("drained")
        return total

    def rescue(self) -> list[Rescued]:
        """Expired leases back to pending (claimed again at once) or failed at the maximum attempts."""
        assert self._store is not None
        rescued = self.rescuer.rescue(self._store)
        if any(item.status == "pending" for item in rescued):
            self.drain()
        return rescued

    def sweep(self) -> int:
        """Remove the images row and object of jobs that ended failed or cancelled since the last sweep."""
        assert self._store is not None
        return self.rescuer.sweep(self._store)


def run_listener(settings: Settings, listener: Listener | None = None) -> None:
    """`imagen listen`: run until SIGTERM or SIGINT, then exit cleanly (a test passes its `listener`)."""
    import signal

    listener = listener or Listener(settings)

    def _stop(signum: int, frame: object) -> None:
        log.info("listener: signal %s received, finishing the forward in hand", signum)
        listener.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    listener.run()
