"""The books beside the job row under faults: one usage row per provider call, no image for a job not done.

check_invariants holds imagen.usage to the mock provider's own call log after
every scenario (one row per answered call) and proves no job that is not `done`
keeps an images row or an object; these scenarios aim faults at exactly those
writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.reliability.harness import Harness

pytestmark = pytest.mark.slow

MOCK = {"backend": "mock", "size": "16x16"}


def terminate_workers_connections(h: Harness) -> int:
    rows = h.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'imagen-actors'"
    )
    return sum(1 for (ok,) in rows if ok)


@pytest.mark.parametrize("chained", [True, False], ids=["stages-chained", "stages-queued"])
def test_worker_connections_terminated_in_a_backlog_leave_one_usage_row_per_call(
    harness: Callable[..., Harness], chained: bool
) -> None:
    # As a restart or a failover does to every session: each worker statement in flight fails,
    # usage writes among them; the pool replaces the connections and the stages retry.
    h = harness()
    if not chained:
        h.set_env(IMAGEN_CHAIN_STAGES="false")
    h.start_workers(1, threads=8)
    h.start_listener()
    ids = h.insert_backlog(300, MOCK)
    terminated, rounds = 0, 0
    while h.unfinished() and rounds < 40:
        terminated += terminate_workers_connections(h)
        rounds += 1
        time.sleep(0.1)  # the fault's rhythm, not a wait for a condition
    h.figures.update(termination_rounds=rounds, connections_terminated=terminated)
    figures = h.finish(deadline=90)
    assert figures["jobs"] == len(ids)
    assert terminated >= 10, f"the faults hit nothing: {terminated} connections terminated"
    assert figures["usage_rows"] == figures["provider_calls"] >= len(ids)
