"""InFlightGate: the claimer's pacing at the in-flight cap, as arithmetic on counts and a clock."""

from __future__ import annotations

import pytest

from imagen.listener.gate import SATURATED_POLL, SATURATED_POLL_MAX, InFlightGate


def drain(gate: InFlightGate, running: list[int], now: float, backlog: int = 10_000) -> int:
    """What the claimer does on one wake: claim batches until the gate says wait or the backlog is gone."""
    total = 0
    while True:
        want = gate.want(running[0], now)
        if not want:
            return total
        got = min(want, backlog - total)
        gate.claimed()
        if not got:
            return total
        running[0] += got
        total += got
        if got < want or gate.filled(want, now):
            return total


def test_below_the_cap_a_claim_takes_a_whole_batch() -> None:
    gate = InFlightGate(max_in_flight=256, claim_batch=100)

    assert gate.want(0, 0.0) == 100
    assert gate.want(200, 0.0) == 56
    assert gate.saturated is False


def test_the_refill_is_an_eighth_of_the_cap_at_most_a_batch_at_least_one() -> None:
    assert InFlightGate(80, 100).refill == 10
    assert InFlightGate(10_000, 100).refill == 100
    assert InFlightGate(4, 100).refill == 1


def test_at_the_cap_it_claims_a_refill_at_a_time_not_a_job_or_two() -> None:
    gate = InFlightGate(max_in_flight=80, claim_batch=100)
    running = [0]

    assert drain(gate, running, 0.0) == 80, "claims up to the cap, then stops"
    assert gate.saturated
    running[0] -= 3
    assert drain(gate, running, 0.01) == 0, "3 free slots are not worth a claim"
    running[0] -= 7
    assert drain(gate, running, 0.02) == 10, "a refill's worth is"


def test_at_the_cap_it_counts_again_at_the_pace_jobs_finish() -> None:
    gate = InFlightGate(max_in_flight=80, claim_batch=100)
    running, now = [0], 1000.0
    drain(gate, running, now)
    waits = [gate.wait]  # just filled: check again soon
    for _ in range(6):  # nothing finishes: back off, to a bound
        now += gate.wait
        drain(gate, running, now)
        waits.append(gate.wait)
    running[0] -= 5  # 5 in 0.5 s: 10 a second, 5 more make a refill: 0.5 s, capped
    now += 0.5
    drain(gate, running, now)
    waits.append(gate.wait)
    running[0] -= 2  # 2 in 0.1 s: 20 a second, 3 more: 0.15 s
    now += 0.1
    drain(gate, running, now)
    waits.append(gate.wait)

    assert waits == pytest.approx(
        [
            SATURATED_POLL,
            0.02,
            0.04,
            0.08,
            0.16,
            SATURATED_POLL_MAX,
            SATURATED_POLL_MAX,
            SATURATED_POLL_MAX,
            0.15,
        ]
    )


def test_on_a_steady_backlog_each_refill_waits_for_the_next_so_one_count_finds_room() -> None:
    gate = InFlightGate(max_in_flight=80, claim_batch=100)
    running, now = [0], 1000.0
    claimed = [drain(gate, running, now)]  # fills the cap; no pace known yet
    waits = [gate.wait]
    for _ in range(4):  # workers finish 100 jobs a second
        now += 0.1
        running[0] -= 10
        claimed.append(drain(gate, running, now))
        waits.append(gate.wait)

    assert claimed == [80, 10, 10, 10, 10]
    assert waits == pytest.approx([SATURATED_POLL, 0.1, 0.1, 0.1, 0.1])


def test_a_drained_backlog_below_the_cap_leaves_the_gate_open() -> None:
    gate = InFlightGate(max_in_flight=80, claim_batch=100)

    assert drain(gate, [0], 0.0, backlog=30) == 30

    assert gate.saturated is False
    assert gate.want(30, 0.1) == 50


def test_a_cap_filled_by_other_listeners_is_counted_again_soon_and_less_often_while_nothing_finishes() -> (
    None
):
    gate = InFlightGate(max_in_flight=20, claim_batch=100)

    assert gate.want(20, 0.0) == 0, "the others' jobs fill the cap: nothing to claim"
    assert gate.saturated and gate.wait == SATURATED_POLL, "count again soon, not at the next poll"
    assert gate.want(20, 0.01) == 0 and gate.wait == pytest.approx(0.02)
    assert gate.want(20, 0.03) == 0 and gate.wait == pytest.approx(0.04)


def test_one_job_finishing_at_the_cap_sets_the_pace_of_the_next_count() -> None:
    gate = InFlightGate(max_in_flight=16, claim_batch=100)  # a refill is 2 jobs
    assert gate.want(0, 0.0) == 16 and gate.filled(16, 0.0)

    assert gate.want(15, 0.1) == 0, "one free slot is not a refill"

    assert gate.wait == pytest.approx(0.1), "one job in 0.1 s: the second one takes 0.1 s more"
