"""A StageContext on the in-memory job store, for the stage unit tests: no PostgreSQL, no Redis.

The hand-off is a dict, storage a folder that remembers each upload and can be told to fail,
and the broker keeps each message (actor, queue, args, delay) instead of enqueueing it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from imagen.config import Settings
from imagen.handoff import HandedOff
from imagen.stages import StageContext
from imagen.storage import LocalStorage, StoredObject
from imagen.store import ImageMeta, InMemoryJobStore
from tests.integration.conftest import RecordingBroker

OWNER = UUID("00000000-0000-4000-8000-00000000aaaa")
MOCK = {"backend": "mock", "size": "16x16"}


class MemoryHandoff:
    """The hand-off between stages as a dict (Redis in production); `fail_put` makes the next put fail."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], HandedOff] = {}
        self.fail_put: list[BaseException] = []

    def put(self, job_id: Any, attempt: int, data: bytes, meta: ImageMeta) -> None:
        if self.fail_put:
            raise self.fail_put.pop(0)
        self.entries[(str(job_id), attempt)] = HandedOff(data, meta)

    def get(self, job_id: Any, attempt: int) -> HandedOff | None:
        return self.entries.get((str(job_id), attempt))

    def drop(self, job_id: Any, attempt: int) -> None:
        self.entries.pop((str(job_id), attempt), None)


@dataclass
class Upload:
    path: str
    mime: str
    size: int


class RecordingStorage(LocalStorage):
    """Local storage that remembers what was uploaded; `fail_put`/`fail_delete` make the next call fail,
    `during_put` runs inside an upload (another worker, a cancel, a wait for the heartbeat)."""

    def __init__(self, root: Path, bucket: str) -> None:
        super().__init__(root, bucket)
        self.uploads: list[Upload] = []
        self.fail_put: list[BaseException] = []
        self.fail_delete: list[BaseException] = []
        self.during_put: list[Any] = []

    def put(self, path: str, data: bytes, mime: str) -> StoredObject:
        self.uploads.append(Upload(path, mime, len(data)))
        if self.fail_put:
            raise self.fail_put.pop(0)
        stored = super().put(path, data, mime)
        if self.during_put:
            self.during_put.pop(0)()
        return stored

    def delete(self, path: str) -> bool:
        if self.fail_delete:
            raise self.fail_delete.pop(0)
        return super().delete(path)


class QueueBroker(RecordingBroker):
    """RecordingBroker that also keeps each message's queue; `fail_next` makes the next enqueue fail."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[tuple[str, str, tuple[Any, ...], int | None]] = []
        self.fail_next: list[BaseException] = []

    def enqueue(self, message: Any, *, delay: int | None = None) -> Any:
        if self.fail_next:
            raise self.fail_next.pop(0)
        self.messages.append((message.actor_name, message.queue_name, tuple(message.args), delay))
        return super().enqueue(message, delay=delay)


@dataclass
class Stages:
    """One test's context and the fakes behind it, typed."""

    ctx: StageContext
    store: InMemoryJobStore
    storage: RecordingStorage
    handoff: MemoryHandoff
    broker: QueueBroker
    root: Path

    def objects(self) -> list[Path]:
        """The files in storage (temporary upload files included, so a leftover one shows)."""
        return sorted(p for p in self.root.rglob("*") if p.is_file())


def make_stages(tmp_path: Path, *, clock: Callable[[], float] = time.monotonic, **settings: Any) -> Stages:
    values: dict[str, Any] = {
        "storage": "local", "storage_dir": tmp_path / "storage", "output_dir": tmp_path / "out",
        "usage_spool_dir": tmp_path / "spool", "job_test_options": True, **settings,
    }  # fmt: skip
    store, handoff, broker = InMemoryJobStore(), MemoryHandoff(), QueueBroker()
    storage = RecordingStorage(tmp_path / "storage", "imagen")
    ctx = StageContext(
        Settings(_env_file=None, **values),  # type: ignore[call-arg]
        broker,
        store=store,
        storage=storage,
        handoff=handoff,  # type: ignore[arg-type]
        clock=clock,
    )
    return Stages(ctx, store, storage, handoff, broker, tmp_path / "storage")


def claimed(store: InMemoryJobStore, params: dict[str, Any] | None = None, owner: UUID = OWNER) -> str:
    job_id = store.submit_job(owner, "a cat", params or MOCK)
    (claim,) = store.claim_jobs(1)
    assert claim.job_id == job_id
    return str(job_id)


def job(store: InMemoryJobStore, job_id: str) -> dict[str, Any]:
    row = store.get_job(job_id)
    assert row is not None
    return row


def transitions(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    """The job transition lines (docs/operations.md "Logs") of one event."""
    return [r for r in caplog.records if r.name == "imagen.jobs" and getattr(r, "event", None) == event]


def logged(record: logging.LogRecord) -> dict[str, Any]:
    """A transition line's fields as a JSON log line carries them."""
    names = ("event", "job_id", "attempt", "stage", "image_id", "error", "reason")
    return {name: getattr(record, name) for name in names if getattr(record, name, None) is not None}
