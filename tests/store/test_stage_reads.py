"""The stages' other store calls: the heartbeat thread's look-up, quota reads, images without a job,
and the usage spool's replay, on both stores."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from uuid import UUID, uuid4

from imagen.store import ImageMeta, ImageRow, JobStore
from imagen.usage import UsageRecord
from imagen.usage_spool import UsageSpool
from tests.store.conftest import Harness

OWNER = UUID("00000000-0000-4000-8000-0000000000ee")
OTHER = UUID("00000000-0000-4000-8000-0000000000ef")
META = ImageMeta(
    mime="image/png", width=8, height=8, backend="mock", model="mock-1", prompt="a fox", params={"seed": 1}
)


def spent(owner: UUID, *, images: int, cost: float, ok: bool = True, days_ago: int = 0) -> UsageRecord:
    return UsageRecord(
        backend="mock", model="mock-1", images=images, ok=ok, latency_ms=1.0, cost_usd=cost,
        owner_user_id=owner, created_at=datetime.now(UTC) - timedelta(days=days_ago),
    )  # fmt: skip


def test_only_the_attempt_that_holds_a_job_counts_as_still_running(store: JobStore) -> None:
    held = store.submit_job(OWNER, "a fox", {})
    cancelled = store.submit_job(OWNER, "a hare", {})
    store.claim_jobs(2)
    assert store.cancel_job(cancelled)
    keys = [(str(held), 1), (str(held), 2), (str(cancelled), 1), (str(uuid4()), 1)]
    assert store.still_running(keys) == {(str(held), 1)}


def test_an_owner_without_an_override_has_none_and_one_with_it_gets_its_limits(
    store: JobStore, harness: Harness
) -> None:
    assert store.owner_quota(OWNER) is None
    harness.set_quota(OWNER, 5, 1.5)
    assert store.owner_quota(OWNER) == (5, 1.5)
    harness.set_quota(OTHER, None, 0.25)
    assert store.owner_quota(OTHER) == (None, 0.25)


def test_used_today_counts_successful_images_and_every_calls_cost_of_that_owner_since_midnight(
    store: JobStore,
) -> None:
    assert store.used_today(OWNER) == (0, 0.0)
    for record in (
        spent(OWNER, images=2, cost=0.5),
        spent(OWNER, images=1, cost=0.25, ok=False),  # a failed call: billed, no image
        spent(OWNER, images=4, cost=9.0, days_ago=2),  # another day
        spent(OTHER, images=3, cost=1.0),  # another owner
    ):
        store.record_usage(record)
    images, cost = store.used_today(OWNER)
    assert (images, round(cost, 6)) == (2, 0.75)


def test_an_image_without_a_job_belongs_to_the_owner_given_and_one_with_a_job_is_one_row(
    store: JobStore, harness: Harness
) -> None:
    first = store.insert_image(ImageRow.of(None, "imagen", f"cli/{OWNER}/a.png", 10, META), OWNER)
    second = store.insert_image(ImageRow.of(None, "imagen", f"cli/{OWNER}/b.png", 10, META), OWNER)
    assert first != second, "images without a job are rows of their own"
    job_id = store.submit_job(OWNER, "a fox", {})
    row = ImageRow.of(job_id, "imagen", f"{OWNER}/{job_id}.png", 10, META)
    assert store.insert_image(row, OWNER) == store.insert_image(row, OWNER)
    (written,) = harness.images(job_id)
    assert (written["owner_user_id"], written["width"], written["params"]) == (OWNER, 8, {"seed": 1})


def test_replaying_the_spool_writes_each_record_once_and_empties_it(
    store: JobStore, harness: Harness, tmp_path: Path
) -> None:
    spool = UsageSpool(tmp_path / "spool")
    landed, waiting = spent(OWNER, images=1, cost=0.1), spent(OWNER, images=1, cost=0.2)
    store.record_usage(landed)  # its write had landed after all: the replay leaves one row
    assert spool.put(landed) and spool.put(waiting)
    store.replay_usage(spool)
    assert spool.pending() == []
    assert harness.usage_call_ids() == sorted([landed.call_id, waiting.call_id])


def test_an_override_may_set_only_the_image_limit(store: JobStore, harness: Harness) -> None:
    harness.set_quota(OWNER, 3, None)

    assert store.owner_quota(OWNER) == (3, None)


def test_used_today_starts_at_midnight_utc_and_counts_an_unpriced_call_as_free(store: JobStore) -> None:
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    at_midnight = dataclasses.replace(spent(OWNER, images=2, cost=0.5), created_at=midnight)
    before = dataclasses.replace(
        spent(OWNER, images=5, cost=5.0), created_at=midnight - timedelta(microseconds=1)
    )
    unpriced = dataclasses.replace(spent(OWNER, images=1, cost=0.0), cost_usd=None)
    for record in (at_midnight, before, unpriced):
        store.record_usage(record)

    images, cost = store.used_today(OWNER)

    assert (images, round(cost, 6)) == (3, 0.5)


def test_an_images_row_records_what_made_it_and_when(store: JobStore, harness: Harness) -> None:
    job_id = store.submit_job(OWNER, "a fox", {})
    store.insert_image(ImageRow.of(job_id, "imagen", f"{OWNER}/{job_id}.png", 10, META), OWNER)

    (row,) = harness.images(job_id)

    assert (row["backend"], row["model"], row["prompt"], row["mime"], row["bytes"]) == (
        "mock", "mock-1", "a fox", "image/png", 10,
    )  # fmt: skip
    assert row["created_at"] is not None


def test_the_replay_says_how_many_records_it_wrote(store: JobStore, tmp_path: Path) -> None:
    spool = UsageSpool(tmp_path / "spool")
    assert store.replay_usage(spool) == 0
    for cost in (0.1, 0.2, 0.3):
        assert spool.put(spent(OWNER, images=1, cost=cost))

    assert store.replay_usage(spool) == 3
    assert store.replay_usage(spool) == 0


def test_every_override_is_read_at_once_up_to_the_limit_asked(store: JobStore, harness: Harness) -> None:
    assert store.owner_quotas(10) == {}
    harness.set_quota(OWNER, 5, 1.5)
    harness.set_quota(OTHER, None, 0.25)
    assert store.owner_quotas(10) == {OWNER: (5, 1.5), OTHER: (None, 0.25)}
    (one,) = store.owner_quotas(1).items()
    assert one in {(OWNER, (5, 1.5)), (OTHER, (None, 0.25))}
