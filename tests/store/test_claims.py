"""Claim, release and the in-flight count, the same on every store."""

from __future__ import annotations

from uuid import UUID, uuid4

from imagen.store import JobStore

OWNER_A = UUID("00000000-0000-4000-8000-00000000000a")
OWNER_B = UUID("00000000-0000-4000-8000-00000000000b")
OWNER_C = UUID("00000000-0000-4000-8000-00000000000c")


def submit(store: JobStore, owner: UUID, n: int = 1) -> list[UUID]:
    return [store.submit_job(owner, f"prompt {i}", {"backend": "mock"}) for i in range(n)]


def test_claim_takes_every_owners_oldest_job_before_anyones_second(store: JobStore) -> None:
    a = submit(store, OWNER_A, 3)
    b = submit(store, OWNER_B, 2)
    c = submit(store, OWNER_C, 1)

    claims = store.claim_jobs(10)

    assert [claim.job_id for claim in claims] == [a[0], b[0], c[0], a[1], b[1], a[2]]


def test_claim_takes_at_most_the_limit_and_leaves_the_rest_pending(store: JobStore) -> None:
    a = submit(store, OWNER_A, 3)
    b = submit(store, OWNER_B, 3)

    first = store.claim_jobs(2)
    second = store.claim_jobs(10)

    assert [c.job_id for c in first] == [a[0], b[0]]
    assert [c.job_id for c in second] == [a[1], b[1], a[2], b[2]]
    assert store.claim_jobs(10) == []
    assert store.count_running() == 6


def test_claim_caps_the_owners_per_batch(store: JobStore) -> None:
    a = submit(store, OWNER_A, 2)
    b = submit(store, OWNER_B, 2)
    submit(store, OWNER_C, 2)

    claims = store.claim_jobs(10, max_owners=2)

    assert sorted(c.job_id for c in claims) == sorted([*a, *b])


def test_a_claim_starts_an_attempt_queued_with_a_fresh_lease(store: JobStore) -> None:
    (job_id,) = submit(store, OWNER_A)

    (claim,) = store.claim_jobs(1)

    row = store.get_job(job_id)
    assert row is not None
    assert (claim.job_id, claim.attempt, claim.owner_user_id) == (job_id, 1, OWNER_A)
    assert (row["status"], row["stage"], row["attempt"]) == ("running", "queued", 1)
    assert row["heartbeat_at"] is not None and claim.claimed_at >= claim.created_at
    assert list(row["stage_times"]) == ["queued"]
    assert store.claim_jobs(1) == []


def test_release_puts_a_claim_back_without_counting_the_attempt(store: JobStore) -> None:
    (job_id,) = submit(store, OWNER_A)
    (claim,) = store.claim_jobs(1)

    assert store.release_claim(job_id, claim.attempt) is True
    assert store.release_claim(job_id, claim.attempt) is False

    assert store.job_state(job_id) == ("pending", 0)
    assert store.count_running() == 0
    assert [c.attempt for c in store.claim_jobs(1)] == [1]


def test_state_of_an_unknown_job_is_none(store: JobStore) -> None:
    assert store.job_state(uuid4()) is None
    assert store.get_job(uuid4()) is None


def test_one_job_at_a_time_alternates_owners_instead_of_draining_the_oldest(store: JobStore) -> None:
    a = submit(store, OWNER_A, 3)
    b = submit(store, OWNER_B, 3)

    taken = [claim.job_id for _ in range(6) for claim in store.claim_jobs(1)]

    assert taken == [a[0], b[0], a[1], b[1], a[2], b[2]]


def test_a_newcomer_waits_one_round_not_behind_the_whole_backlog(store: JobStore) -> None:
    a = submit(store, OWNER_A, 4)
    assert [c.job_id for c in store.claim_jobs(2)] == a[:2]
    (b,) = submit(store, OWNER_B)

    assert [c.job_id for c in store.claim_jobs(10)] == [a[2], b, a[3]]


def test_a_job_put_back_to_pending_is_claimed_first_again(store: JobStore) -> None:
    a = submit(store, OWNER_A, 2)
    b = submit(store, OWNER_B, 2)
    first = store.claim_jobs(2)
    for claim in first:
        store.release_claim(claim.job_id, claim.attempt)

    assert [c.job_id for c in store.claim_jobs(10)] == [a[0], b[0], a[1], b[1]]


def test_a_claim_released_into_an_empty_queue_and_a_newcomer_share_the_current_round(store: JobStore) -> None:
    a = submit(store, OWNER_A, 3)
    store.claim_jobs(3)  # nothing left pending
    assert store.release_claim(a[2], 1)  # its round was the third: it takes the current one
    (b,) = submit(store, OWNER_B)
    (a_next,) = submit(store, OWNER_A)  # one round after its owner's job that is back

    assert [c.job_id for c in store.claim_jobs(10)] == [a[2], b, a_next]


def test_a_claim_released_while_another_owner_waits_goes_into_the_current_round(store: JobStore) -> None:
    a = submit(store, OWNER_A, 3)
    store.claim_jobs(3)
    (b,) = submit(store, OWNER_B)  # the current round
    assert store.release_claim(a[2], 1)  # from its third round back into the current one, not behind b

    assert [c.job_id for c in store.claim_jobs(10)] == [a[2], b]


def test_a_claim_within_the_cap_takes_only_the_room_left_and_says_how_many_ran(store: JobStore) -> None:
    a = submit(store, OWNER_A, 5)

    first, running = store.claim_within_cap(10, 3)
    assert [c.job_id for c in first] == a[:3] and running == 0
    more, running = store.claim_within_cap(10, 4)
    assert [c.job_id for c in more] == a[3:4] and running == 3, "the count before this claim"
    assert store.claim_within_cap(10, 4) == ([], None), "at the cap: nothing, and no count"
    assert store.count_running() == 4


def test_a_claim_within_the_cap_takes_no_more_than_its_limit_when_there_is_more_room(store: JobStore) -> None:
    a = submit(store, OWNER_A, 5)

    claims, running = store.claim_within_cap(2, 100)

    assert ([c.job_id for c in claims], running) == (a[:2], 0)
