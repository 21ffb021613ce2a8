"""Provider admission through the real listener and real Dramatiq workers on real PostgreSQL and Redis.

The provider is imagen/devtools/bench/provider.py: the OpenAI wire format on loopback, admitting
a fixed number of calls at once and answering 429 + Retry-After beyond. The workers use
the real openai backend against it (OPENAI_BASE_URL).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from imagen.devtools.bench.provider import CappedProvider, capped_provider
from tests.integration.rows import query
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

OPENAI = {"backend": "openai", "size": "1024x1024"}


@pytest.fixture
def provider() -> Iterator[CappedProvider]:
    with capped_provider(capacity=2, latency_s=0.2, retry_after="1") as server:
        yield server


def provider_env(server: CappedProvider, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "sk-test", "NO_PROXY": "127.0.0.1",
        "IMAGEN_JOB_BACKENDS": "openai", **extra,
    }  # fmt: skip


def submit_many(db_url: str, count: int, params: dict[str, Any] = OPENAI) -> list[uuid.UUID]:
    """`count` jobs in one INSERT statement, as a burst from the UI."""
    owner = uuid.uuid4()
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, params)"
            " SELECT %s, 'a fox number ' || i, %s::jsonb FROM generate_series(1, %s) AS i RETURNING id",
            (owner, json.dumps(params), count),
        ).fetchall()
    return [row[0] for row in rows]


def statuses(db_url: str, ids: list[uuid.UUID]) -> dict[str, int]:
    rows = query(db_url, "SELECT status, count(*) FROM imagen.jobs WHERE id = ANY(%s) GROUP BY status", ids)
    return {status: n for status, n in rows}


def wait_ended(db_url: str, ids: list[uuid.UUID], procs: Any, timeout: float) -> dict[str, int]:
    def ended() -> dict[str, int] | None:
        found = statuses(db_url, ids)
        return found if found.get("done", 0) + found.get("failed", 0) == len(ids) else None

    return wait_until(ended, timeout=timeout, message=f"jobs ended: {statuses(db_url, ids)}\n{procs.logs()}")


def test_burst_against_a_capped_provider_finishes_every_job_within_the_cap(
    db_url: str, pipeline: Any, provider: CappedProvider
) -> None:
    procs = pipeline(workers=2, threads=4, **provider_env(provider, IMAGEN_BACKEND_CONCURRENCY="openai=2"))
    ids = submit_many(db_url, 40)
    ended = wait_ended(db_url, ids, procs, timeout=120)
    assert ended == {"done": 40}, query(db_url, "SELECT error FROM imagen.jobs WHERE status = 'failed'")
    assert provider.most_in_flight <= 2
    assert provider.served == 40
    # Two worker processes share the cap through Redis: the provider refuses next to nothing.
    assert provider.refused <= 2, f"{provider.refused} calls were answered 429"
    assert query(db_url, "SELECT max(attempt) FROM imagen.jobs WHERE id = ANY(%s)", ids) == [(1,)]


def test_jobs_finish_after_a_provider_that_answered_429_for_3_s_recovers(
    db_url: str, pipeline: Any, provider: CappedProvider
) -> None:
    procs = pipeline(workers=1, threads=4, **provider_env(provider))
    provider.capacity = 100  # no concurrency limit here: only the 429 spell
    provider.refuse_for(3.0)
    ids = submit_many(db_url, 8)
    ended = wait_ended(db_url, ids, procs, timeout=60)
    assert ended == {"done": 8}, query(db_url, "SELECT error FROM imagen.jobs WHERE status = 'failed'")
    # The whole pool waits out each Retry-After (1 s): a few 429s a second, not every thread's retries.
    assert provider.refused <= 16, f"{provider.refused} calls were answered 429"
    # Waiting for the provider used no retry: nothing was noted as a failed try.
    assert query(db_url, "SELECT count(*) FROM imagen.jobs WHERE id = ANY(%s) AND attempt <> 1", ids) == [
        (0,)
    ]


def test_job_fails_once_the_provider_kept_it_waiting_past_the_throttle_limit(
    db_url: str, pipeline: Any, provider: CappedProvider
) -> None:
    procs = pipeline(workers=1, threads=2, IMAGEN_THROTTLE_MAX_WAIT="3", **provider_env(provider))
    provider.refuse_for(3600)
    (job_id,) = submit_many(db_url, 1)
    wait_ended(db_url, [job_id], procs, timeout=30)
    ((status, error, attempt),) = query(
        db_url, "SELECT status, error, attempt FROM imagen.jobs WHERE id = %s", job_id
    )
    assert status == "failed" and attempt == 1
    assert error.startswith("generation failed: provider rate limit: waited 3 s"), error
    assert "rate limited (429 rate_limit_exceeded)" in error


@pytest.mark.slow
def test_a_slot_held_by_a_killed_worker_frees_itself(
    db_url: str, pipeline: Any, provider: CappedProvider
) -> None:
    env = provider_env(
        provider,
        IMAGEN_BACKEND_CONCURRENCY="openai=1",
        IMAGEN_GENERATE_TIME_LIMIT="5",
        IMAGEN_PROVIDER_TIMEOUT="4",
    )
    procs = pipeline(workers=1, threads=2, **env)
    provider.latency_s = 30  # the first call hangs while its worker is killed
    first = submit_many(db_url, 1)
    wait_until(lambda: provider.in_flight == 1, timeout=30, message=f"first call made\n{procs.logs()}")
    (workers,) = [p for p in procs.procs if p.name == "workers"]
    workers.kill_group()
    workers.popen.wait()
    provider.latency_s = 0.1
    replacement = procs.start_workers(processes=1, threads=2)
    wait_until(lambda: replacement.ready_count() >= 1, timeout=30, message=f"workers ready\n{procs.logs()}")
    second = submit_many(db_url, 1)
    # The dead worker's slot expires after the generation time limit + 10 s; then the cap admits again.
    ended = wait_ended(db_url, second, procs, timeout=45)
    assert ended == {"done": 1}
    assert first != second
