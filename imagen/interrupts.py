"""Waits a stage can abandon: the mock's simulated delay and every real provider call.

Dramatiq's TimeLimit (and its shutdown notice) raise an exception in the worker
thread, which Python delivers only when that thread runs bytecode: a ten-minute
`time.sleep` or a blocking socket read is never interrupted, so one job could
hold a worker thread, its lease and a SIGTERM for as long as it liked (issue 14).
Here a wait is sliced (`SLICE` seconds at a time) and, between slices, asks the
stop check the stage installed for this thread (`stoppable`) whether to give up:
the stage's time limit passed, the job was cancelled or moved on, or the worker
is stopping. A provider call runs in a helper thread the stage thread waits on in
the same slices; an abandoned call is left to end by its own HTTP timeout
(IMAGEN_PROVIDER_TIMEOUT, below the stage limit) and its answer is dropped.
Without a stop check (the CLI) a wait is still sliced, so Dramatiq's own
interrupts get through.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from imagen.errors import ImagenError, TransientError

T = TypeVar("T")
SLICE = 0.1

StopCheck = Callable[[], BaseException | None]
_local = threading.local()


class CallAbandoned(TransientError):
    """The stage gave up waiting (time limit, or the worker is stopping); the job is retried."""


class JobGone(ImagenError):
    """The job was cancelled or rescued while its call ran: nothing more to do for this attempt."""

    is_transient = False


@contextmanager
def stoppable(check: StopCheck) -> Iterator[None]:
    """Waits in this thread within the block raise what `check` returns, once it returns something."""
    previous = getattr(_local, "check", None)
    _local.check = check
    try:
        yield
    finally:
        _local.check = previous


def _raise_if_stopped() -> None:
    check: StopCheck | None = getattr(_local, "check", None)
    if check is not None:
        reason = check()
        if reason is not None:
            raise reason


def sleep(seconds: float) -> None:
    """time.sleep that a stop check, Dramatiq's time limit or its shutdown notice can cut short."""
    deadline = time.monotonic() + seconds
    while True:
        _raise_if_stopped()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(SLICE, left))


def call(fn: Callable[[], T]) -> T:
    """Run a blocking call (a provider request) so the calling thread can abandon it.

    Without a stop check installed the call runs in this thread, as before.
    """
    if getattr(_local, "check", None) is None:
        return fn()
    outcome: list[T] = []
    failure: list[BaseException] = []
    finished = threading.Event()

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # handed to the waiting thread
            failure.append(exc)
        finally:
            finished.set()

    threading.Thread(target=run, name="imagen-provider-call", daemon=True).start()
    while not finished.wait(SLICE):
        _raise_if_stopped()
    if failure:
        raise failure[0]
    return outcome[0]
