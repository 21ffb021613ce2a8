"""The stages' promises about an attempt, through their entry points on real PostgreSQL and Redis:
a long provider call keeps its lease, a lost hand-off regenerates the same attempt, a new
attempt never syncs an older attempt's image, and a job cancelled while queued never
reaches the provider. Each test fails with the line that keeps the promise removed (issue 21).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import redis

from imagen.broker import GENERATE_ACTOR, SYNC_ACTOR
from imagen.config import Settings
from imagen.errors import TransientError
from imagen.stages import StageContext, run_generate, run_sync
from imagen.store import PostgresJobStore
from tests.integration.conftest import RecordingBroker

LEASE = 3.0


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url, redis_url=redis_url, storage="local", storage_dir=tmp_path / "storage",
        output_dir=tmp_path / "out", listener_metrics_port=0, lease_seconds=600, max_attempts=3,
        job_test_options=True, chain_stages=False,
    )  # fmt: skip


@pytest.fixture
def store(db_url: str) -> PostgresJobStore:
    return PostgresJobStore.from_url(db_url)


@contextlib.contextmanager
def stage_context(settings: Settings) -> Iterator[StageContext]:
    context = StageContext(settings, RecordingBroker())
    try:
        yield context
    finally:
        context.close()


def claimed(store: PostgresJobStore, params: dict[str, Any] | None = None) -> UUID:
    job_id = store.submit_job(uuid4(), "a lighthouse", params or {"backend": "mock", "size": "16x16"})
    (claim,) = store.claim_jobs(1)
    assert (claim.job_id, claim.attempt) == (job_id, 1)
    return job_id


def images(store: PostgresJobStore, job_id: UUID) -> int:
    with store.connect() as conn:
        return int(
            conn.execute("SELECT count(*) FROM imagen.images WHERE job_id = %s", (job_id,)).fetchone()[0]
        )


def test_a_provider_call_longer_than_the_lease_keeps_its_job_while_the_rescuer_runs(
    settings: Settings, store: PostgresJobStore
) -> None:
    # A 7 s call under a 3 s lease: only the heartbeat thread tells the rescuer the call is alive.
    # Without it the rescuer takes the job back mid-call and a second attempt pays again.
    leased = settings.model_copy(update={"lease_seconds": LEASE})
    job_id = claimed(store, {"backend": "mock", "size": "16x16", "delay_ms": int(LEASE * 1000 * 7 / 3)})
    rescued: list[Any] = []
    with stage_context(leased) as context:
        call = threading.Thread(target=run_generate, args=(context, str(job_id), 1), daemon=True)
        call.start()
        while call.is_alive():  # the listener's rescue, on a fast poll
            rescued += store.rescue_expired(lease_seconds=LEASE, max_attempts=3)
            call.join(0.2)
        sent = list(context.broker.sent)

    assert rescued == [], "a job in a live provider call was rescued"
    assert store.job_state(job_id) == ("running", 1)
    assert sent == [(SYNC_ACTOR, (str(job_id), 1))], "the call finished and handed its image on"


def test_a_sync_whose_hand_off_is_gone_regenerates_the_same_attempt(
    settings: Settings, store: PostgresJobStore
) -> None:
    job_id = claimed(store)
    with stage_context(settings) as context:
        run_generate(context, str(job_id), 1)
        assert context.broker.sent == [(SYNC_ACTOR, (str(job_id), 1))]
        redis.Redis.from_url(settings.redis_url).flushdb()  # the hand-off expired, or Redis lost it

        run_sync(context, str(job_id), 1)

        assert context.broker.sent[1:] == [(GENERATE_ACTOR, (str(job_id), 1))]
    assert store.job_state(job_id) == ("running", 1) and images(store, job_id) == 0


def test_a_new_attempt_never_syncs_the_image_an_older_attempt_handed_off(
    settings: Settings, store: PostgresJobStore
) -> None:
    # Attempt 1 generated and handed off, then lost its lease before the sync ran. Attempt 2's
    # sync must not find attempt 1's image: it generates its own (with its own usage and checks).
    job_id = claimed(store)
    with stage_context(settings) as context:
        run_generate(context, str(job_id), 1)
        with store.connect() as conn:
            conn.execute(
                "UPDATE imagen.jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", (job_id,)
            )
        assert [r.status for r in store.rescue_expired(lease_seconds=600, max_attempts=3)] == ["pending"]
        assert [c.attempt for c in store.claim_jobs(1)] == [2]
        assert store.begin_stage(job_id, 2, "generating") is not None

        run_sync(context, str(job_id), 2)

        assert context.broker.sent[1:] == [(GENERATE_ACTOR, (str(job_id), 2))]
    assert images(store, job_id) == 0


class CountingBackend:
    """A provider that counts its calls and never answers: a test that reaches it has failed."""

    name = "mock"
    interruptible = True

    def __init__(self) -> None:
        self.calls = 0

    def default_model(self) -> str:
        return "counting"

    def generate(self, request: Any) -> Any:
        self.calls += 1
        raise TransientError("the provider was called")


def test_a_job_cancelled_while_queued_never_reaches_the_provider(
    settings: Settings, store: PostgresJobStore
) -> None:
    job_id = claimed(store)  # claimed and forwarded: its message waits in Redis
    assert store.cancel_job(job_id)
    with stage_context(settings) as context:
        provider = CountingBackend()
        context.backends["mock"] = provider

        run_generate(context, str(job_id), 1)  # the worker takes the message

        assert provider.calls == 0 and context.broker.sent == []
    assert store.job_state(job_id) == ("cancelled", 1)
    with store.connect() as conn:
        usage = conn.execute("SELECT count(*) FROM imagen.usage WHERE job_id = %s", (job_id,)).fetchone()
    assert usage == (0,)
