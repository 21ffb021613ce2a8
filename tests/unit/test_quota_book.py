"""The worker's quota book: how often it reads the operator's overrides, and what it does with them."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from imagen.quotas import Quota, QuotaBook, QuotaReached


class Overrides:
    """The two override reads of a job store, counted; `rows` is imagen.owner_quotas."""

    def __init__(self, rows: dict[UUID, tuple[int | None, float | None]] | None = None) -> None:
        self.rows = dict(rows or {})
        self.all_reads = 0
        self.owner_reads: list[UUID] = []
        self.fail_next = False
        self.used: tuple[int, float] = (0, 0.0)

    def owner_quota(self, owner_user_id: UUID) -> tuple[int | None, float | None] | None:
        self.owner_reads.append(owner_user_id)
        return self.rows.get(owner_user_id)

    def owner_quotas(self, limit: int) -> dict[UUID, tuple[int | None, float | None]]:
        self.all_reads += 1
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("database went away")
        return dict(list(self.rows.items())[:limit])

    def used_today(self, owner_user_id: UUID) -> tuple[int, float]:
        return self.used


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_backlog_from_3000_owners_reads_the_overrides_once_not_once_an_owner() -> None:
    limited = uuid4()
    store = Overrides({limited: (5, None)})
    book = QuotaBook(None, 2.0, clock=Clock())
    quotas = [book.quota_for(store, uuid4()) for _ in range(3000)]
    assert store.all_reads == 1
    assert store.owner_reads == []
    assert set(quotas) == {Quota(None, 2.0)}
    assert book.quota_for(store, limited) == Quota(5, 2.0)


def test_an_operators_new_override_counts_once_the_interval_has_passed() -> None:
    owner, clock = uuid4(), Clock()
    store = Overrides()
    book = QuotaBook(None, None, ttl_s=30.0, clock=clock)
    assert book.quota_for(store, owner) == Quota(None, None)
    store.rows[owner] = (1, 0.5)
    clock.now += 29.0
    assert book.quota_for(store, owner) == Quota(None, None), "trusted for the interval"
    clock.now += 2.0
    assert book.quota_for(store, owner) == Quota(1, 0.5)
    del store.rows[owner]
    clock.now += 31.0
    assert book.quota_for(store, owner) == Quota(None, None), "a removed override stops counting"
    assert store.all_reads == 3


def test_past_the_cap_each_owners_override_is_read_when_met_and_cached() -> None:
    owners = [uuid4() for _ in range(5)]
    store = Overrides({o: (i + 1, None) for i, o in enumerate(owners)})
    clock = Clock()
    book = QuotaBook(None, None, at_once=3, clock=clock)
    assert [book.quota_for(store, o).daily_images for o in owners] == [1, 2, 3, 4, 5]
    assert book.quota_for(store, owners[0]).daily_images == 1
    assert store.owner_reads == owners, "one read per owner, the second check of owners[0] cached"
    assert store.all_reads == 1, "the read of every override is not repeated within the interval"
    clock.now += 31.0
    book.quota_for(store, owners[0])
    assert store.all_reads == 2
    assert store.owner_reads == [*owners, owners[0]]


def test_a_failed_read_of_the_overrides_fails_this_check_and_is_tried_again_on_the_next() -> None:
    owner = uuid4()
    store = Overrides({owner: (0, None)})
    book = QuotaBook(None, None, clock=Clock())
    store.fail_next = True
    with pytest.raises(ConnectionError):
        book.quota_for(store, owner)
    assert book.quota_for(store, owner) == Quota(0, None)
    assert store.all_reads == 2


def test_an_override_from_the_snapshot_refuses_a_call_over_it() -> None:
    owner = uuid4()
    store = Overrides({owner: (3, None)})
    store.used = (3, 0.0)
    book = QuotaBook(None, None, clock=Clock())
    with pytest.raises(QuotaReached, match="daily image quota of 3 reached"):
        book.check(store, owner, 1)
    book.check(store, uuid4(), 1)  # no override, no default: no limit
