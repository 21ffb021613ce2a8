"""Admission to a provider call: caps shared by every worker, the provider's pauses, owner quotas.

Every worker on every host asks the same Redis before it calls a provider:
- a concurrency cap (IMAGEN_BACKEND_CONCURRENCY) is N slots, each one of Dramatiq's
  `ConcurrentRateLimiter`s with limit 1 whose key expires after the generation time
  limit + 10 s, so a worker killed during a call frees its slot by itself (one limiter with
  limit N would hold a dead worker's slot for as long as others keep using it);
- a rate cap (IMAGEN_BACKEND_RPM) is Dramatiq's `WindowRateLimiter` over 60 s;
- a provider pause: a 429, or a 503 with Retry-After, sets a key that expires after the
  advised wait (bounded by IMAGEN_THROTTLE_MAX_WAIT), and every call of that backend and
  model waits it out: the whole pool backs off, not only the thread that was told to.
A call that finds no room waits in its thread for at most `HOLD_S` (woken as soon as a
slot is released), then gives its thread back: `Deferred` tells the stage to send the
job's message again with a delay. Waiting uses no attempt and no retry. Quotas are in
`imagen.quotas`; `check_quota` here runs them with their log line and metric.

It never calls a provider and never writes the job row: the stage does both.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any
from uuid import UUID

from imagen.backends.base import Backend, ImageRequest, ImageResult
from imagen.config import Settings
from imagen.errors import ImagenError, PermanentError, RateLimited
from imagen.logs import transition
from imagen.quotas import QuotaBook, QuotaReached, QuotaReads

log = logging.getLogger(__name__)

PREFIX = "imagen:admission"
# Longest a call waits for room in its worker thread before the job is sent again with a delay.
HOLD_S = 2.0
# A slot's key outlives the generation time limit by this much, then a dead holder's slot is free.
SLOT_MARGIN_S = 10.0
# A 429 without advice pauses the backend this long.
DEFAULT_PAUSE_S = 2.0
# Where GatedBackend notes on a throttling error how long it paused the pool.
PAUSE_ATTR = "admission_pause_s"
# Longest delay before a job that waits for a slot (not for the provider) asks again.
MAX_SLOT_DELAY_S = 10.0


class Deferred(Exception):
    """No room for the call now: send the job again after `delay_s`.

    `provider_wait` says whether the provider asked for the wait (it then counts towards
    IMAGEN_THROTTLE_MAX_WAIT) or one of our own caps is full (it counts towards nothing).
    """

    def __init__(self, delay_s: float, reason: str, *, provider_wait: bool, waited_s: float = 0.0) -> None:
        super().__init__(f"{reason}: again in {delay_s:.1f} s")
        self.delay_s = delay_s
        self.reason = reason
        self.provider_wait = provider_wait
        self.waited_s = waited_s


class ThrottleExhausted(PermanentError):
    """The provider kept the job waiting longer than IMAGEN_THROTTLE_MAX_WAIT."""


def is_throttle(exc: BaseException) -> bool:
    """A 429 rate limit, or a transient error that came with the provider's advised wait (503)."""
    if isinstance(exc, RateLimited):
        return True
    return isinstance(exc, ImagenError) and exc.is_transient and getattr(exc, "retry_after", None) is not None


@dataclass(frozen=True)
class Metrics:
    waits: Any
    wait_seconds: Any
    throttled: Any
    quota_refusals: Any


_metrics_lock = threading.Lock()


def metrics() -> Metrics:
    """Prometheus counters, made on first use: after Dramatiq's Prometheus middleware has set the
    multiprocess folder in the worker, so the workers' exporter serves them. Under a lock: the
    first calls come from many threads at once, and a counter registered twice raises."""
    with _metrics_lock:
        return _make_metrics()


@cache
def _make_metrics() -> Metrics:
    from prometheus_client import Counter

    return Metrics(
        waits=Counter(
            "imagen_admission_waits", "Provider calls that had to wait for room", ["backend", "reason"]
        ),
        wait_seconds=Counter(
            "imagen_admission_wait_seconds", "Time calls waited for room, seconds", ["backend", "reason"]
        ),
        throttled=Counter(
            "imagen_provider_throttled", "Provider answers that asked us to slow down (429, 503)", ["backend"]
        ),
        quota_refusals=Counter(
            "imagen_quota_refusals", "Jobs failed over their owner's daily quota", ["owner", "kind"]
        ),
    )


def check_quota(
    book: QuotaBook, store: QuotaReads, owner: UUID, images: int, *, job_id: str, attempt: int
) -> None:
    """The owner quota check before a provider call; logs and counts a refusal, then raises it."""
    try:
        book.check(store, owner, images)
    except QuotaReached as exc:
        metrics().quota_refusals.labels(str(owner), exc.kind).inc()
        transition("quota_refused", job_id, attempt, "generating", owner_user_id=owner, kind=exc.kind)
        raise


class Gate:
    """The shared admission state in Redis for one worker process."""

    def __init__(self, settings: Settings, client: Any) -> None:
        from dramatiq.rate_limits import ConcurrentRateLimiter, WindowRateLimiter
        from dramatiq.rate_limits.backends import RedisBackend

        self.client = client
        self.max_pause_s = settings.throttle_max_wait
        backend = RedisBackend(client=client)
        # A slot outlives no call: the generation time limit interrupts a call before its key expires.
        slot_ttl_ms = int((settings.generate_time_limit + SLOT_MARGIN_S) * 1000)
        self.slots = {
            key: [
                ConcurrentRateLimiter(backend, f"{PREFIX}:slot:{key}:{i}", limit=1, ttl=slot_ttl_ms)
                for i in range(cap)
            ]
            for key, cap in settings.concurrency_caps.items()
        }
        self.windows = {
            key: WindowRateLimiter(backend, f"{PREFIX}:rpm:{key}", limit=rpm, window=60)
            for key, rpm in settings.rpm_caps.items()
        }

    @staticmethod
    def keys(backend: str, model: str) -> tuple[str, str]:
        return backend, f"{backend}/{model}"

    def is_open(self) -> bool:
        """True when nothing is configured: no Redis round trip per call then, unless a pause is set."""
        return not self.slots and not self.windows

    def pause_left(self, backend: str, model: str) -> float:
        """Seconds the provider asked this backend and model to wait, from Redis's clock (0 if none)."""
        ms = self.client.pttl(f"{PREFIX}:pause:{backend}/{model}")
        return max(0, int(ms)) / 1000

    def pause(self, backend: str, model: str, advised_s: float | None) -> float:
        """Make every worker wait before the next call of this backend and model; returns the wait."""
        wait = min(advised_s if advised_s is not None else DEFAULT_PAUSE_S, self.max_pause_s)
        wait = max(wait, 0.05)
        # Last writer wins: the newest advice is the provider's freshest.
        self.client.set(f"{PREFIX}:pause:{backend}/{model}", 1, px=int(wait * 1000))
        return wait

    @contextmanager
    def admitted(self, backend: str, model: str) -> Iterator[None]:
        """Hold a slot (and a place in the rate window) for one call; raise Deferred when none comes."""
        started = time.monotonic()
        deadline = started + HOLD_S
        while True:
            left = self.pause_left(backend, model)
            if left:
                if time.monotonic() + left > deadline:
                    raise Deferred(
                        left, "provider pause", provider_wait=True, waited_s=time.monotonic() - started
                    )
                time.sleep(left)
                continue
            stack = ExitStack()
            refused = self._enter(stack, backend, model)
            if refused is None:
                break
            if time.monotonic() >= deadline:
                waited = time.monotonic() - started
                _count_wait(backend, refused, waited)
                raise Deferred(_slot_delay(), f"{refused} cap", provider_wait=False, waited_s=waited)
            self._wait_for_room(refused, backend, model, deadline)
        waited = time.monotonic() - started
        if waited > 0.001:
            _count_wait(backend, "held", waited)
        with stack:
            try:
                yield
            finally:
                self._released(backend, model)

    def _enter(self, stack: ExitStack, backend: str, model: str) -> str | None:
        """Take one slot of every cap that applies, then a place in every rate window; on any refusal
        give back what was taken and name the kind refused."""
        for key in self.keys(backend, model):
            limiters = self.slots.get(key)
            if not limiters:
                continue
            for limiter in random.sample(limiters, len(limiters)):
                if stack.enter_context(limiter.acquire(raise_on_failure=False)):
                    break
            else:
                stack.close()
                return "concurrency"
        for key in self.keys(backend, model):
            window = self.windows.get(key)
            if window is not None and not stack.enter_context(window.acquire(raise_on_failure=False)):
                stack.close()
                return "rpm"
        return None

    def _wait_for_room(self, refused: str, backend: str, model: str, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if refused == "concurrency":
            # Woken by the next release of a slot of this backend (a token per release).
            keys = [f"{PREFIX}:free:{key}" for key in self.keys(backend, model) if key in self.slots]
            self.client.blpop(keys, timeout=max(0.05, min(left, 1.0)))
        else:
            # Rate windows move by the second.
            time.sleep(min(left, 1.0 - time.time() % 1.0 + random.uniform(0, 0.05)))

    def _released(self, backend: str, model: str) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key in self.keys(backend, model):
            cap = len(self.slots.get(key, ()))
            if cap:
                free = f"{PREFIX}:free:{key}"
                pipe.rpush(free, 1)
                pipe.ltrim(free, -cap, -1)
                pipe.expire(free, 60)
        pipe.execute()


def _slot_delay() -> float:
    return random.uniform(0.5, 2.0)


def _count_wait(backend: str, reason: str, seconds: float) -> None:
    m = metrics()
    if reason != "held":
        m.waits.labels(backend, reason).inc()
    m.wait_seconds.labels(backend, reason).inc(seconds)


@dataclass(frozen=True)
class Wait:
    """A job to be sent again: after `delay_s`, having been kept waiting by the provider `throttled_s`."""

    delay_s: float
    throttled_s: float
    reason: str
    is_provider: bool


def deferral(exc: BaseException, throttled_s: float, settings: Settings) -> Wait | None:
    """How the job waits, or None when `exc` asks for no wait.

    A wait the provider asked for (a 429, a 503 with Retry-After, a pause another worker was
    told) adds to the job's total; once that passes IMAGEN_THROTTLE_MAX_WAIT the job fails with
    ThrottleExhausted. Waiting for our own caps adds nothing. No delay is longer than a quarter
    of the lease: each return refreshes the job's heartbeat, so a waiting job is never rescued.
    """
    if isinstance(exc, Deferred):
        delay, provider, waited, last, reason = exc.delay_s, exc.provider_wait, exc.waited_s, None, exc.reason
    elif is_throttle(exc):
        delay, provider, waited, last = getattr(exc, PAUSE_ATTR, DEFAULT_PAUSE_S), True, 0.0, exc
        reason = "provider answered 429" if isinstance(exc, RateLimited) else "provider asked to retry later"
    else:
        return None
    limit = settings.throttle_max_wait
    if provider:
        throttled_s += waited
        if throttled_s >= limit:
            text = f"provider rate limit: waited {throttled_s:.0f} s (IMAGEN_THROTTLE_MAX_WAIT={limit:g})"
            raise ThrottleExhausted(text + (f"; last answer: {last}" if last is not None else ""))
        # Spread the pool's return over a little time past the pause, and end at the limit.
        delay = min(delay + random.uniform(0, min(1.0, delay / 4)), limit - throttled_s + 0.01)
        throttled_s += delay
    else:
        delay = min(delay, MAX_SLOT_DELAY_S)
    return Wait(min(delay, settings.lease_seconds / 4), throttled_s, reason, provider)


class GatedBackend:
    """A backend whose every call passes the gate; a throttling answer pauses the whole pool."""

    def __init__(self, backend: Backend, gate: Gate) -> None:
        self.inner = backend
        self.gate = gate
        self.name = backend.name

    def default_model(self) -> str:
        return self.inner.default_model()

    def __getattr__(self, name: str) -> Any:
        # Anything else a backend offers (size checks, capabilities) is the provider's own.
        return getattr(self.inner, name)

    def generate(self, request: ImageRequest) -> ImageResult:
        model = request.model or self.inner.default_model()
        if self.gate.is_open() and (self.name == "mock" or not self.gate.pause_left(self.name, model)):
            # Nothing to wait for: no Redis round trip per call for the mock, which is never throttled.
            return self._call(request, model)
        with self.gate.admitted(self.name, model):
            return self._call(request, model)

    def _call(self, request: ImageRequest, model: str) -> ImageResult:
        try:
            return self.inner.generate(request)
        except ImagenError as exc:
            if is_throttle(exc):
                wait = self.gate.pause(self.name, model, getattr(exc, "retry_after", None))
                setattr(exc, PAUSE_ATTR, wait)
                metrics().throttled.labels(self.name).inc()
                log.info(
                    "provider %s/%s asked to slow down; pool pauses %.1f s: %s", self.name, model, wait, exc
                )
            raise


class GatedBackends(dict[str, Backend]):
    """The stage context's backend cache: every backend put in is wrapped in the gate."""

    def __init__(self, gate: Gate) -> None:
        super().__init__()
        self.gate = gate
        self._lock = threading.Lock()

    def __setitem__(self, name: str, backend: Backend) -> None:
        with self._lock:
            if name not in self:
                super().__setitem__(name, GatedBackend(backend, self.gate))
