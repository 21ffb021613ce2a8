"""The operator's reads and writes (`imagen jobs ...`, `imagen web`), the same on every store."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import cast
from uuid import UUID, uuid4

import pytest

from imagen.store import ImageRow, JobStore
from imagen.store.operator import JobRefused, OperatorStore
from imagen.usage import UsageRecord
from tests.store.conftest import Harness

OWNER = UUID("00000000-0000-4000-8000-0000000000ee")
OTHER = UUID("00000000-0000-4000-8000-0000000000ef")


@pytest.fixture
def ops(store: JobStore) -> OperatorStore:
    return cast(OperatorStore, store)


def done(store: JobStore, prompt: str = "a lighthouse", owner: UUID = OWNER) -> tuple[UUID, UUID]:
    """A job that ended done with an images row: (job id, image id)."""
    job_id = store.submit_job(owner, prompt, {"backend": "mock"})
    claims = store.claim_jobs(100)
    attempt = next(c.attempt for c in claims if c.job_id == job_id)
    row = ImageRow(
        job_id=job_id, bucket="imagen", path=f"{owner}/{job_id}.png", mime="image/png", width=8, height=8,
        bytes=10, prompt=prompt, backend="mock", model="mock-1", params={},
    )  # fmt: skip
    image_id = store.record_job_image(attempt, row, complete_after=0.0)
    assert image_id is not None
    return job_id, image_id


def ended(store: JobStore, how: str, owner: UUID = OWNER) -> UUID:
    job_id = store.submit_job(owner, f"ends {how}", {})
    if how == "failed":
        (claim,) = store.claim_jobs(1)
        assert store.fail_job(job_id, claim.attempt, "generation failed: no")
    else:
        assert store.cancel_job(job_id)
    return job_id


def call(
    owner: UUID | None, cost: float | None, *, ok: bool = True, images: int = 1, job: UUID | None = None
) -> UsageRecord:
    return UsageRecord(
        backend="mock", model="priced" if cost is not None else "free-for-all", images=images, ok=ok,
        latency_ms=5.0, cost_usd=cost, owner_user_id=owner, job_id=job, call_id=uuid4(),
    )  # fmt: skip


def test_the_list_is_newest_first_and_each_filter_narrows_it(ops: OperatorStore, store: JobStore) -> None:
    first = store.submit_job(OWNER, "a red fox", {})
    second = store.submit_job(OTHER, "100% blue_sky", {})
    third = store.submit_job(OWNER, "a RED barn", {})
    store.cancel_job(first)

    assert [j.id for j in ops.list_jobs()] == [third, second, first]
    assert [j.id for j in ops.list_jobs(limit=2)] == [third, second]
    assert [j.id for j in ops.list_jobs(statuses=["cancelled"])] == [first]
    assert [j.id for j in ops.list_jobs(owner=OTHER)] == [second]
    assert [j.id for j in ops.list_jobs(text="red")] == [third, first]  # any case
    # % and _ are the text itself, not wildcards.
    assert [j.id for j in ops.list_jobs(text="0% blue_")] == [second]
    assert ops.list_jobs(text="0%_blue") == []
    created = ops.list_jobs(statuses=["pending"])[0].created_at
    assert [j.id for j in ops.list_jobs(since=created)] == [third]


def test_counts_by_status_and_stage_and_the_capped_counts(ops: OperatorStore, store: JobStore) -> None:
    for _ in range(5):
        store.submit_job(OWNER, "p", {})
    claims = store.claim_jobs(3)
    for claim in claims[:2]:
        store.begin_stage(claim.job_id, claim.attempt, "generating")
    ended(store, "cancelled")

    assert sorted(ops.status_counts(), key=str) == sorted(
        [
            ("pending", None, 2),
            ("running", "generating", 2),
            ("running", "queued", 1),
            ("cancelled", None, 1),
        ],
        key=str,
    )
    assert ops.capped_counts(1) == {"pending": 1, "running": 1, "done": 0, "failed": 0, "cancelled": 1}
    assert ops.capped_counts(10)["pending"] == ops.pending_count() == 2
    assert ops.running_by_stage() == {"generating": 2, "queued": 1}
    oldest = ops.oldest_pending_seconds()
    assert oldest is not None and 0 <= oldest < 60


def test_nothing_pending_has_no_oldest_age_and_nothing_claimed_no_last_claim(ops: OperatorStore) -> None:
    assert ops.oldest_pending_seconds() is None
    assert ops.last_claim(3600) is None


def test_the_window_counts_what_finished_and_the_latencies_of_the_done_jobs(
    ops: OperatorStore, store: JobStore
) -> None:
    done(store)
    done(store)
    ended(store, "failed")
    ended(store, "cancelled")
    store.submit_job(OWNER, "still pending", {})

    window = ops.finished_window(3600)

    whole = window.whole
    assert (whole.done, whole.failed, whole.cancelled) == (2, 1, 1)
    assert whole.pickup_p50 is not None and whole.pickup_p95 is not None
    assert whole.total_p50 is not None and whole.total_p95 is not None
    assert 0 <= whole.pickup_p50 <= whole.pickup_p95 <= whole.total_p95 < 60
    assert window.minutes == []  # only when asked
    assert window.start.second == 0 and window.start.microsecond == 0


def test_per_minute_the_window_adds_up_to_the_whole(ops: OperatorStore, store: JobStore) -> None:
    done(store)
    ended(store, "failed")

    window = ops.finished_window(3600, by_minute=True)

    assert window.minutes and all(m.minute >= window.start for m in window.minutes)
    assert sum(m.done for m in window.minutes) == 1 and sum(m.failed for m in window.minutes) == 1
    assert ops.last_claim(3600) is not None


def test_an_empty_window_has_counts_of_zero_and_no_latencies(ops: OperatorStore) -> None:
    whole = ops.finished_window(60, by_minute=True).whole

    assert (whole.done, whole.failed, whole.cancelled, whole.pickup_p50, whole.total_p95) == (
        0,
        0,
        0,
        None,
        None,
    )


def test_spend_counts_every_call_and_names_the_ones_it_could_not_price(
    ops: OperatorStore, store: JobStore
) -> None:
    store.record_usage(call(OWNER, 0.25))
    store.record_usage(call(OWNER, 0.5, ok=False))
    store.record_usage(call(OTHER, None))

    spend = ops.usage_cost(3600)

    assert (spend.calls, spend.cost_usd, spend.unpriced_calls) == (3, 0.75, 1)
    assert spend.unpriced_models == ["mock/free-for-all"]


def test_owners_today_are_the_spenders_first_and_those_with_an_override(
    ops: OperatorStore, store: JobStore, harness: Harness
) -> None:
    quiet = UUID("00000000-0000-4000-8000-0000000000f0")
    store.record_usage(call(OWNER, 0.1, images=2))
    store.record_usage(call(OWNER, 0.1, ok=False, images=3))  # a failed call costs but makes no image
    store.record_usage(call(OTHER, 1.0))
    harness.set_quota(quiet, 5, None)

    days = ops.owners_today()

    assert [(d.owner_user_id, d.images, round(d.cost_usd, 6), d.overridden) for d in days] == [
        (OTHER, 1, 1.0, False),
        (OWNER, 2, 0.2, False),
        (quiet, 0, 0.0, True),
    ]
    assert (days[2].daily_images, days[2].daily_cost_usd) == (5, None)
    assert len(ops.owners_today(limit=1)) == 1


def test_a_jobs_image_and_usage_rows_as_show_prints_them(ops: OperatorStore, store: JobStore) -> None:
    job_id, image_id = done(store)
    store.record_usage(call(OWNER, 0.1, job=job_id))

    image = ops.job_image(job_id, image_id)
    assert image is not None and image["id"] == image_id and image["path"] == f"{OWNER}/{job_id}.png"
    assert ops.job_image(job_id, None) == image  # found by its job when the job links none
    (use,) = ops.job_usage(job_id)
    assert (use["backend"], use["images"], use["ok"]) == ("mock", 1, True)
    row = ops.image_row(image_id)
    assert row is not None and (row["job_id"], row["owner_user_id"]) == (job_id, OWNER)
    assert ops.image_row(uuid4()) is None


def test_prune_takes_only_ended_jobs_in_batches_and_keeps_their_images_detached(
    ops: OperatorStore, store: JobStore, harness: Harness
) -> None:
    done_job, image_id = done(store)
    failed = ended(store, "failed")
    ended(store, "cancelled")
    pending = store.submit_job(OWNER, "waiting", {})

    assert ops.count_prunable(["done", "failed"], 0) == 2
    assert ops.count_prunable(["done", "failed", "cancelled"], 3600) == 0  # none is that old
    assert ops.prune_batch(["done", "failed", "cancelled"], 0, 2)[0] == 2
    assert ops.prune_batch(["done", "failed", "cancelled", "pending"], 0, 2)[0] == 1

    assert store.get_job(pending) is not None
    assert store.get_job(done_job) is None and store.get_job(failed) is None
    row = ops.image_row(image_id)
    assert row is not None and row["job_id"] is None


def test_prune_says_how_many_images_it_detached(ops: OperatorStore, store: JobStore) -> None:
    done(store)
    done(store)
    ended(store, "failed")

    assert ops.prune_batch(["done", "failed"], 0, 100) == (3, 2)


def test_a_job_its_owner_could_not_insert_is_refused_and_nothing_is_written(
    ops: OperatorStore, store: JobStore
) -> None:
    job_id = ops.submit_as_owner(OWNER, "a cat", {"size": "16x16"})
    assert store.job_state(job_id) == ("pending", 0)

    with pytest.raises(JobRefused, match=r"the database refused the job: .*jobs_prompt_check"):
        ops.submit_as_owner(OWNER, "   ", {})
    assert [j.id for j in ops.list_jobs()] == [job_id]


def test_no_listener_is_connected_to_a_store_nobody_listens_on(ops: OperatorStore) -> None:
    assert ops.listener_sessions() == []


def test_a_job_finished_long_ago_is_outside_a_short_window(ops: OperatorStore, store: JobStore) -> None:
    ended(store, "cancelled")

    assert ops.finished_window(timedelta(hours=1).total_seconds()).whole.cancelled == 1
    assert ops.count_prunable(["cancelled"], timedelta(hours=1).total_seconds()) == 0


def test_a_list_line_carries_the_jobs_own_columns(ops: OperatorStore, store: JobStore) -> None:
    job_id, image_id = done(store, "a lighthouse at dusk")
    failed = ended(store, "failed")

    lines = {j.id: j for j in ops.list_jobs()}

    for job in (job_id, failed):
        row = store.get_job(job)
        assert row is not None
        assert dataclasses.asdict(lines[job]) == {name: row[name] for name in SUMMARY}
    assert (lines[job_id].status, lines[job_id].image_id, lines[job_id].attempt) == ("done", image_id, 1)
    assert lines[failed].error == "generation failed: no" and lines[failed].owner_user_id == OWNER


SUMMARY = (
    "id", "owner_user_id", "status", "stage", "attempt", "prompt", "error", "image_id", "created_at",
    "claimed_at", "finished_at",
)  # fmt: skip


def test_the_capped_counts_count_done_and_failed_jobs_too(ops: OperatorStore, store: JobStore) -> None:
    done(store)
    done(store)
    ended(store, "failed")

    assert ops.capped_counts(5) == {"pending": 0, "running": 0, "done": 2, "failed": 1, "cancelled": 0}
    assert ops.capped_counts(1)["done"] == 1


def test_show_reads_the_same_image_and_usage_columns_on_every_store(
    ops: OperatorStore, store: JobStore
) -> None:
    job_id, image_id = done(store)
    later, earlier = call(OWNER, 0.2, job=job_id), call(OWNER, None, ok=False, job=job_id)
    store.record_usage(dataclasses.replace(later, created_at=earlier.created_at + timedelta(seconds=5)))
    store.record_usage(earlier)
    store.record_usage(call(OWNER, 0.3, job=store.submit_job(OWNER, "another job", {})))

    image = ops.job_image(job_id, image_id)
    usage = ops.job_usage(job_id)

    assert image is not None and set(image) == {
        "id", "bucket", "path", "mime", "width", "height", "bytes", "backend", "model", "created_at",
    }  # fmt: skip
    assert (image["mime"], image["width"], image["bytes"], image["model"]) == ("image/png", 8, 10, "mock-1")
    costs = [u["cost_usd"] for u in usage]
    assert [(u["model"], u["ok"]) for u in usage] == [("free-for-all", False), ("priced", True)]
    assert costs == [None, 0.2]
    assert set(usage[0]) == {
        "backend", "model", "images", "input_tokens", "output_tokens", "cost_usd", "cost_basis", "latency_ms",
        "ok", "error", "created_at",
    }  # fmt: skip
    row = ops.image_row(image_id)
    assert row is not None and set(row) == {
        "id", "job_id", "owner_user_id", "bucket", "path", "mime", "width", "height", "bytes",
    }  # fmt: skip


def test_a_jobs_image_is_found_by_the_id_it_links_or_not_at_all(ops: OperatorStore, store: JobStore) -> None:
    _, image_id = done(store)
    pending = store.submit_job(OWNER, "no image yet", {})

    found = ops.job_image(pending, image_id)  # an id the job links is found by that id alone

    assert found is not None and found["id"] == image_id
    assert ops.job_image(pending, None) is None
    assert ops.job_image(uuid4(), uuid4()) is None
    assert ops.job_usage(pending) == []


def test_prune_counts_a_jobs_age_from_when_it_finished(
    ops: OperatorStore, store: JobStore, harness: Harness
) -> None:
    finished_long_ago = ended(store, "cancelled")
    harness.backdate(finished_long_ago, 7200.0)
    created_long_ago = store.submit_job(OWNER, "waited, then failed", {})
    harness.backdate(created_long_ago, 7200.0)
    (claim,) = store.claim_jobs(1)
    store.fail_job(created_long_ago, claim.attempt, "generation failed: no")

    assert ops.count_prunable(["cancelled", "failed"], 3600) == 1
    assert ops.prune_batch(["cancelled", "failed"], 3600, 10) == (1, 0)
    assert store.get_job(finished_long_ago) is None and store.get_job(created_long_ago) is not None


@pytest.mark.parametrize(
    ("prompt", "params", "constraint"),
    [
        ("\t\n\r\f\v ", {}, "jobs_prompt_check"),
        ("p" * 4001, {}, "jobs_prompt_check"),
        ("a cat", ["not", "an", "object"], "jobs_params_check"),
        # 16,385 bytes of params as jsonb prints them: é is two bytes, not a six-byte \u escape.
        ("a cat", {"k": "é" * 8187 + "xx"}, "jobs_params_size_check"),
    ],
)
def test_the_refusal_names_the_check_the_job_broke(
    ops: OperatorStore, prompt: str, params: object, constraint: str
) -> None:
    with pytest.raises(JobRefused, match=rf'violates check constraint "{constraint}"'):
        ops.submit_as_owner(OWNER, prompt, params)  # type: ignore[arg-type]
    assert ops.list_jobs() == []


def test_a_job_at_the_limits_is_accepted(ops: OperatorStore, store: JobStore) -> None:
    longest = ops.submit_as_owner(OWNER, "p" * 4000, {})
    largest = ops.submit_as_owner(OWNER, " a cat ", {"k": "é" * 8187 + "x"})  # 16,384 bytes: the limit
    # Only ASCII whitespace is blank to the check (btrim's list): a no-break space is a prompt.
    spaced = ops.submit_as_owner(OWNER, "\u00a0", {})

    assert store.job_state(longest) == store.job_state(largest) == store.job_state(spaced) == ("pending", 0)
    job = store.get_job(largest)
    assert job is not None and (job["prompt"], job["owner_user_id"]) == (" a cat ", OWNER)
    assert job["params"] == {"k": "é" * 8187 + "x"}
