"""The stage context: the resources a stage gets, the messages it sends, and what it does at
worker boot and exit, on the in-memory store (no PostgreSQL, no Redis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import UUID

from imagen.broker import SYNC_ACTOR, SYNC_QUEUE
from imagen.config import Settings
from imagen.stages import StageContext
from imagen.storage import open_storage
from imagen.store import InMemoryJobStore
from imagen.usage import UsageRecord
from tests.stage_context import MemoryHandoff
from tests.unit.test_stage_generate import MessageBroker
from tests.waiting import wait_until

OWNER = UUID("00000000-0000-4000-8000-00000000cccc")


class ClosingStore(InMemoryJobStore):
    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def close(self) -> None:
        self.closed = True


def settings(tmp_path: Path, **values: Any) -> Settings:
    base = {"storage": "local", "storage_dir": tmp_path / "storage", "usage_spool_dir": tmp_path / "spool"}
    return Settings(_env_file=None, **{**base, **values})  # type: ignore[call-arg]


def usage(images: int) -> UsageRecord:
    return UsageRecord(backend="mock", model="m", images=images, ok=True, latency_ms=1, owner_user_id=OWNER)


def test_a_context_uses_the_store_storage_and_hand_off_it_is_given(tmp_path: Path) -> None:
    store, handoff = InMemoryJobStore(), MemoryHandoff()
    storage = open_storage(settings(tmp_path))

    ctx = StageContext(settings(tmp_path), MessageBroker(), store=store, storage=storage, handoff=handoff)  # type: ignore[arg-type]

    assert (ctx.store, ctx.storage, ctx.handoff) == (store, storage, handoff)


def test_closing_a_context_closes_its_store_and_never_opens_one_to_close_it(tmp_path: Path) -> None:
    store = ClosingStore()
    used = StageContext(settings(tmp_path), MessageBroker(), store=store)
    used.close()
    assert store.closed

    unused = StageContext(settings(tmp_path, database_url=None), MessageBroker())
    unused.close()  # no database configured: building a store here would raise
    assert "store" not in unused.__dict__


def test_a_stage_message_goes_to_its_queue_at_once_or_after_the_delay_asked(tmp_path: Path) -> None:
    ctx = StageContext(settings(tmp_path), MessageBroker(), store=InMemoryJobStore())

    ctx.send(SYNC_ACTOR, SYNC_QUEUE, "job", 1)
    ctx.send(SYNC_ACTOR, SYNC_QUEUE, "job", 2, delay_ms=1500)

    assert [(m.actor_name, m.queue_name, m.args) for m in ctx.broker.messages] == [
        (SYNC_ACTOR, SYNC_QUEUE, ("job", 1)),
        (SYNC_ACTOR, SYNC_QUEUE, ("job", 2)),
    ]
    assert ctx.broker.delays == [None, 1500]


def test_a_worker_writes_the_hosts_spooled_usage_rows_at_boot_and_every_poll_after(tmp_path: Path) -> None:
    store = InMemoryJobStore()
    ctx = StageContext(settings(tmp_path, poll_interval=0.05), MessageBroker(), store=store)
    assert ctx.usage_spool.put(usage(1))

    replayer = ctx.replay_usage()
    try:
        wait_until(lambda: len(store.usage) == 1, timeout=5, message="the spooled row is written at boot")
        assert ctx.usage_spool.put(usage(2))
        wait_until(lambda: len(store.usage) == 2, timeout=5, message="and one spooled later, within a poll")
    finally:
        replayer.stop()

    assert sorted(record.images for record in store.usage.values()) == [1, 2]
    assert ctx.usage_spool.pending() == []
