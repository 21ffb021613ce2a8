"""The operator's rules (retry, cancel, prune, stats, show) on the in-memory store: no server needed."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID, uuid4

import pytest

from imagen import jobs_admin
from imagen.cli import jobs_view
from imagen.quotas import Quota, owners_today
from imagen.store import InMemoryJobStore
from imagen.usage import UsageRecord

OWNER = UUID("00000000-0000-4000-8000-00000000a001")


@pytest.fixture
def store() -> InMemoryJobStore:
    return InMemoryJobStore()


def failed(store: InMemoryJobStore) -> UUID:
    job_id = store.submit_job(OWNER, "p", {})
    (claim,) = store.claim_jobs(1)
    store.fail_job(job_id, claim.attempt, "generation failed: no")
    return job_id


def test_retry_and_cancel_say_what_the_job_was(store: InMemoryJobStore) -> None:
    job_id = failed(store)

    assert jobs_admin.retry(store, job_id) == "failed"
    assert jobs_admin.cancel(store, job_id) == "pending"
    assert store.job_state(job_id) == ("cancelled", 1)


def test_a_done_job_cannot_be_retried_and_the_refusal_says_why(store: InMemoryJobStore) -> None:
    job_id = store.submit_job(OWNER, "p", {})
    store.cancel_job(job_id)

    with pytest.raises(jobs_admin.JobStateError, match="is cancelled: only pending or running jobs can be"):
        jobs_admin.cancel(store, job_id)
    with pytest.raises(jobs_admin.JobNotFound, match="no job"):
        jobs_admin.retry(store, uuid4())


def test_prune_refuses_a_status_that_is_not_terminal_and_names_it(store: InMemoryJobStore) -> None:
    with pytest.raises(jobs_admin.JobStateError, match="never pending, running"):
        jobs_admin.prune(store, timedelta(0), ("done", "pending", "running"))
    with pytest.raises(jobs_admin.JobStateError, match="never nothing"):
        jobs_admin.prune(store, timedelta(0), ())


def test_prune_deletes_batch_after_batch_until_none_is_left(
    store: InMemoryJobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jobs_admin, "PRUNE_BATCH", 2)
    for _ in range(5):
        failed(store)
    waiting = store.submit_job(OWNER, "waiting", {})

    dry = jobs_admin.prune(store, timedelta(0), dry_run=True)
    result = jobs_admin.prune(store, timedelta(0))

    assert (dry.count, dry.dry_run, result.count, result.dry_run) == (5, True, 5, False)
    assert list(store.jobs) == [waiting]


def test_stats_count_every_status_order_stages_and_take_the_window(store: InMemoryJobStore) -> None:
    for _ in range(3):
        store.submit_job(OWNER, "p", {})
    first, second = store.claim_jobs(2)
    store.begin_stage(first.job_id, 1, "syncing")
    store.begin_stage(second.job_id, 1, "generating")
    store.fail_job(first.job_id, 1, "no")
    store.record_usage(
        UsageRecord(backend="mock", model="m", images=1, ok=True, latency_ms=1.0, cost_usd=0.5)
    )

    stats = jobs_admin.job_stats(store, timedelta(hours=1))

    assert stats.counts == {"pending": 1, "running": 1, "done": 0, "failed": 1, "cancelled": 0}
    assert stats.queue_depth == 1
    assert list(stats.running_by_stage) == ["generating"]
    assert stats.finished_in_window == {"done": 0, "failed": 1, "cancelled": 0}
    assert (stats.provider_calls, stats.cost_usd, stats.pickup_p50) == (1, 0.5, None)


def test_running_jobs_are_listed_stage_by_stage_in_the_order_a_job_goes() -> None:
    given = {"none": 1, "finalizing": 2, "queued": 3, "generating": 4}

    assert list(jobs_admin.in_stage_order(given)) == ["queued", "generating", "finalizing", "none"]


def test_the_latencies_are_postgresqls_percentile_cont(store: InMemoryJobStore) -> None:
    from imagen.store.memory_operator import percentile_cont

    assert percentile_cont([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile_cont([0.0, 10.0], 0.95) == pytest.approx(9.5)
    assert percentile_cont([7.0], 0.95) == 7.0
    assert percentile_cont([], 0.5) is None


def test_show_prints_the_timeline_and_an_unpriced_call(store: InMemoryJobStore) -> None:
    job_id = failed(store)
    store.record_usage(
        UsageRecord(
            backend="mock",
            model="m",
            images=0,
            ok=False,
            latency_ms=1500.0,
            error="refused",
            cost_basis="unpriced: unknown model",
            owner_user_id=OWNER,
            job_id=job_id,
        )
    )

    lines = jobs_view.detail_lines(jobs_admin.job_detail(store, job_id))

    assert lines[1] == "status      failed (attempt 1)"
    assert [line.split()[0] for line in lines if line.startswith("  ")][:3] == ["created", "queued", "failed"]
    assert "image       -" in lines
    assert any("1.50 s  cost unpriced  failed: refused" in line for line in lines)


def test_owners_today_takes_the_default_where_the_override_sets_no_limit(store: InMemoryJobStore) -> None:
    store.quotas[OWNER] = (None, 2.0)

    (day,) = owners_today(store, Quota(daily_images=10, daily_cost_usd=5.0))

    assert (day.quota, day.overridden) == (Quota(daily_images=10, daily_cost_usd=2.0), True)
    assert jobs_view.quota_lines([day])[1].split()[1:] == [
        "0",
        "/",
        "10",
        "$0.00",
        "/",
        "$2.00",
        "(override)",
    ]
