"""The operator's figures over time (`imagen jobs stats`, the health view): which jobs fall inside a
window, the latencies' percentiles, the per-minute buckets, the oldest pending job and the last claim,
the same on every store. Jobs are moved into the past with the harness, never waited for."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from uuid import UUID

import pytest

from imagen.store import ImageRow, JobStore
from imagen.store.operator import OperatorStore
from imagen.usage import UsageRecord
from tests.store.conftest import Harness

OWNER = UUID("00000000-0000-4000-8000-0000000000cc")
OTHER = UUID("00000000-0000-4000-8000-0000000000cd")
HOUR = 3600.0
MINUTE = timedelta(minutes=1)
SLACK = 5.0  # seconds: what the real calls (a connection each, on a busy machine) add to a latency


@pytest.fixture
def ops(store: JobStore) -> OperatorStore:
    return cast(OperatorStore, store)


def done(store: JobStore, prompt: str = "a lighthouse") -> UUID:
    """A job that was claimed and ended done at once."""
    job_id = store.submit_job(OWNER, prompt, {"backend": "mock"})
    (claim,) = store.claim_jobs(1)
    assert claim.job_id == job_id
    assert store.record_job_image(claim.attempt, image_of(job_id), complete_after=0.0) is not None
    return job_id


def image_of(job_id: UUID) -> ImageRow:
    return ImageRow(
        job_id=job_id, bucket="imagen", path=f"{OWNER}/{job_id}.png", mime="image/png", width=8, height=8,
        bytes=10, prompt="p", backend="mock", model="mock-1", params={},
    )  # fmt: skip


def took(harness: Harness, job_id: UUID, *, total: float, pickup: float) -> None:
    """Make a job that ended just now look as if it waited `pickup` s and took `total` s from its INSERT."""
    harness.backdate(job_id, total, "created_at")
    harness.backdate(job_id, total - pickup, "claimed_at")


def field(store: JobStore, job_id: UUID, column: str) -> Any:
    row = store.get_job(job_id)
    assert row is not None
    return row[column]


def test_the_latencies_are_the_percentiles_of_the_done_jobs_pickup_and_total(
    ops: OperatorStore, store: JobStore, harness: Harness
) -> None:
    for total, pickup in ((100.0, 10.0), (800.0, 80.0), (200.0, 20.0), (400.0, 40.0)):
        took(harness, done(store), total=total, pickup=pickup)
    failed = store.submit_job(OWNER, "fails after a long wait", {})
    store.claim_jobs(1)
    store.fail_job(failed, 1, "generation failed: no")
    took(harness, failed, total=900.0, pickup=800.0)  # only done jobs have latencies

    whole = ops.finished_window(HOUR).whole

    # percentile_cont over four: p50 halfway from the 2nd to the 3rd, p95 85% of the way from the 3rd
    # to the 4th.
    assert (whole.done, whole.failed) == (4, 1)
    assert whole.total_p50 == pytest.approx(200.0 + 0.5 * 200.0, abs=SLACK)
    assert whole.total_p95 == pytest.approx(400.0 + 0.85 * 400.0, abs=SLACK)
    assert whole.pickup_p50 == pytest.approx(20.0 + 0.5 * 20.0, abs=SLACK)
    assert whole.pickup_p95 == pytest.approx(40.0 + 0.85 * 40.0, abs=SLACK)


def test_a_retried_jobs_pickup_counts_from_its_retry_not_from_its_insert(
    ops: OperatorStore, store: JobStore, harness: Harness
) -> None:
    job_id = store.submit_job(OWNER, "a retried one", {})
    store.claim_jobs(1)
    store.fail_job(job_id, 1, "generation failed: no")
    harness.backdate(job_id, 300.0)
    assert store.retry_job(job_id)
    (claim,) = store.claim_jobs(1)
    assert store.record_job_image(claim.attempt, image_of(job_id), complete_after=0.0) is not None

    whole = ops.finished_window(HOUR).whole

    assert whole.pickup_p50 == pytest.approx(0.0, abs=SLACK)
    assert whole.total_p50 == pytest.approx(300.0, abs=SLACK)


def test_a_job_that_finished_before_the_window_is_not_counted(
    ops: OperatorStore, store: JobStore, harness: Harness
) -> None:
    old, recent = done(store), done(store)
    harness.backdate(old, 2 * HOUR)
    harness.backdate(recent, HOUR / 2)

    assert ops.finished_window(HOUR).whole.done == 1
    assert ops.finished_window(3 * HOUR).whole.done == 2
    assert ops.finished_window(HOUR / 4).whole.done == 0


def test_each_minute_bucket_holds_the_jobs_that_finished_in_it_from_the_first_whole_minute(
    ops: OperatorStore, store: JobStore, harness: Harness
) -> None:
    window = 600.0
    before = datetime.now(UTC)
    into_minute = (before - _minute(before)).total_seconds()
    # One job in the window's first whole minute, one in its last, one outside the window, and
    # (unless the minute is about to turn) one in the part-minute before the first whole one:
    # counted in the whole window, in no bucket.
    backs = [window - 60 + into_minute - 30, 5.0, window + 60]
    part = (60 - into_minute) / 2
    if part >= 10:
        backs.append(window - part)
    for back in backs:
        harness.backdate(done(store), back)

    found = ops.finished_window(window, by_minute=True)

    first = _minute(before) - timedelta(seconds=window - 60)
    assert found.start in (first, _minute(datetime.now(UTC)) - timedelta(seconds=window - 60))
    expected: dict[datetime, int] = {}
    for job in cast(OperatorStore, store).list_jobs(statuses=["done"]):
        assert job.finished_at is not None
        if job.finished_at >= found.start:
            minute = found.start + timedelta(minutes=math.floor((job.finished_at - found.start) / MINUTE))
            expected[minute] = expected.get(minute, 0) + 1
    assert [(m.minute, m.done) for m in found.minutes] == sorted(expected.items())
    if found.start == first:  # (a minute that turned during the test shifts the jobs placed above)
        assert len(found.minutes) == 2 and found.whole.done == len(backs) - 1
    assert all(m.failed == m.cancelled == 0 and m.total_p50 is not None for m in found.minutes)


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def test_the_oldest_pending_age_is_the_oldest_pending_jobs(
    ops: OperatorStore, store: JobStore, harness: Harness
) -> None:
    running = store.submit_job(OWNER, "claimed long ago", {})
    store.claim_jobs(1)
    harness.backdate(running, 5 * HOUR)
    older, newer = store.submit_job(OWNER, "older", {}), store.submit_job(OWNER, "newer", {})
    harness.backdate(older, 600.0)
    harness.backdate(newer, 300.0)

    oldest = ops.oldest_pending_seconds()

    assert oldest == pytest.approx(600.0, abs=SLACK)


def test_the_last_claim_is_the_latest_of_the_running_jobs_and_of_those_that_finished_in_the_window(
    ops: OperatorStore, store: JobStore, harness: Harness
) -> None:
    assert store.cancel_job(store.submit_job(OWNER, "cancelled before any claim", {}))
    assert ops.last_claim(HOUR) is None
    finished = done(store)
    harness.backdate(finished, 600.0)
    assert ops.last_claim(HOUR) == field(store, finished, "claimed_at")
    assert ops.last_claim(60.0) is None  # it finished before that window

    running = store.submit_job(OWNER, "running", {})
    store.claim_jobs(1)
    harness.backdate(running, 2 * HOUR)  # claimed long ago, still running: still counts
    assert ops.last_claim(HOUR) == field(store, finished, "claimed_at")
    assert ops.last_claim(60.0) == field(store, running, "claimed_at")

    harness.backdate(finished, 3 * HOUR)
    assert ops.last_claim(HOUR) == field(store, running, "claimed_at")


def test_spend_counts_only_the_calls_inside_the_window(ops: OperatorStore, store: JobStore) -> None:
    store.record_usage(call(OWNER, 0.5, ago=2 * HOUR))
    store.record_usage(call(OWNER, None, ago=2 * HOUR))
    store.record_usage(call(OWNER, 0.25, ago=60.0))

    spend = ops.usage_cost(HOUR)

    assert (spend.calls, spend.cost_usd, spend.unpriced_calls, spend.unpriced_models) == (1, 0.25, 0, [])
    assert ops.usage_cost(3 * HOUR).unpriced_models == ["mock/free-for-all"]


def call(
    owner: UUID | None,
    cost: float | None,
    *,
    ago: float = 0.0,
    at: datetime | None = None,
    images: int = 1,
    model: str | None = None,
) -> UsageRecord:
    return UsageRecord(
        backend="mock", model=model or ("priced" if cost is not None else "free-for-all"), images=images,
        ok=True, latency_ms=5.0, cost_usd=cost, owner_user_id=owner,
        created_at=at or datetime.now(UTC) - timedelta(seconds=ago),
    )  # fmt: skip


def test_unpriced_models_are_named_once_each_in_order(ops: OperatorStore, store: JobStore) -> None:
    for model in ("zeta", "alpha", "zeta"):
        store.record_usage(call(OWNER, None, model=model))

    spend = ops.usage_cost(HOUR)

    assert (spend.calls, spend.cost_usd, spend.unpriced_calls) == (3, 0.0, 3)
    assert spend.unpriced_models == ["mock/alpha", "mock/zeta"]


@pytest.fixture
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's local time zone 14 hours ahead of UTC, as a worker host's may be."""
    monkeypatch.setenv("TZ", "Etc/GMT-14")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("far_from_utc")
def test_owners_today_start_at_midnight_utc_leave_out_calls_without_an_owner_and_break_ties(
    ops: OperatorStore, store: JobStore, harness: Harness
) -> None:
    third, fourth = UUID("00000000-0000-4000-8000-0000000000ca"), UUID("00000000-0000-4000-8000-0000000000c9")
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    store.record_usage(call(OWNER, 0.5, at=midnight - timedelta(microseconds=1)))  # yesterday, just
    store.record_usage(call(None, 9.0))  # nobody's
    store.record_usage(call(OWNER, 0.5, images=1, at=midnight))  # today
    store.record_usage(call(OWNER, None, images=1))  # unpriced: no cost
    store.record_usage(call(OTHER, 1.0, images=3))
    store.record_usage(call(third, 0.5, images=3))
    store.record_usage(call(fourth, 0.5, images=2))
    harness.set_quota(third, None, 2.5)

    days = ops.owners_today()

    # The most spent first; then the most images; then by owner id.
    assert [(d.owner_user_id, d.images, d.cost_usd) for d in days] == [
        (OTHER, 3, 1.0), (third, 3, 0.5), (fourth, 2, 0.5), (OWNER, 2, 0.5),
    ]  # fmt: skip
    assert (days[1].daily_images, days[1].daily_cost_usd, days[1].overridden) == (None, 2.5, True)
    assert [d.owner_user_id for d in ops.owners_today(limit=1)] == [OTHER]
