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

from tests.reliability.harness import LEASE_SLACK, Harness
from tests.reliability.test_cancel import cancel_as_owner

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
    # usage writes among them; the pool replaces the connections and the stages retry. Every
    # 0.3 s for about 5 s; the retries back off 0.2-2 s (production: 1-60 s), so a stage's four
    # tries are not all spent inside the storm.
    h = harness(retry_min_backoff_ms=200, retry_max_backoff_ms=2000)
    if not chained:
        h.set_env(IMAGEN_CHAIN_STAGES="false")
    h.start_workers(1, threads=8)
    h.start_listener()
    ids = h.insert_backlog(300, MOCK)
    terminated, rounds = 0, 0
    while h.unfinished() and rounds < 15:
        terminated += terminate_workers_connections(h)
        rounds += 1
        time.sleep(0.3)  # the fault's rhythm, not a wait for a condition
    h.figures.update(termination_rounds=rounds, connections_terminated=terminated)
    # A stage whose four tries all fall inside the storm fails its job (readably: the invariant
    # checks it), as it would in production; the books must hold either way. Many failures would
    # mean the pool no longer replaces its dead connections (docs/decisions.md).
    figures = h.finish(deadline=90, expect_all_done=False)
    assert figures["jobs"] == len(ids)
    assert figures["failed"] <= len(ids) // 20, f"the storm failed {figures['failed']} jobs"
    assert terminated >= 10, f"the faults hit nothing: {terminated} connections terminated"
    assert figures["usage_rows"] == figures["provider_calls"] >= len(ids)


def test_jobs_waiting_in_finalizing_that_lose_their_message_keep_no_image(
    harness: Callable[..., Harness],
) -> None:
    # Split stages, and no worker takes the final stage yet: every job waits in `finalizing` with
    # its images row and object written and its finalize message in Redis. Owners cancel half;
    # then Redis loses every message. The cancelled jobs' images go at the listener's next sweep;
    # the others are rescued at the maximum attempts (1 here) and failed, and theirs go too.
    h = harness(lease_seconds=6.0, max_attempts=1)
    h.set_env(IMAGEN_CHAIN_STAGES="false")
    h.start_workers(1, 8, "--queues", "imagen-generate", "imagen-sync")
    h.start_listener()
    ids = h.insert_backlog(40, MOCK)
    h.wait(lambda: h.running_by_stage()["finalizing"] == len(ids), 30, "every job waiting in finalizing")
    cancelled = cancel_as_owner(h, "finalizing", len(ids) // 2)
    h.servers.flush_redis()
    flushed = time.monotonic()
    not_done_images = (
        "SELECT count(*) FROM imagen.images i JOIN imagen.jobs j ON j.id = i.job_id"
        " WHERE j.status <> 'done' AND j.status = %s"
    )
    h.wait(lambda: h.scalar(not_done_images, "cancelled") == 0, 10, "cancelled jobs' images swept")
    cancelled_gone = time.monotonic() - flushed
    h.wait_terminal(ids, 30)
    h.wait(lambda: h.scalar(not_done_images, "failed") == 0, 10, "failed jobs' images swept")
    all_gone = time.monotonic() - flushed
    h.figures.update(
        cancelled_in_finalizing=cancelled, cancelled_images_gone_s=round(cancelled_gone, 1),
        all_images_gone_s=round(all_gone, 1),
        swept=h.all_log_text().count(" swept "),
    )  # fmt: skip
    figures = h.finish(deadline=30, expect_all_done=False)
    assert figures["cancelled"] == cancelled == len(ids) // 2
    assert figures["failed"] == len(ids) - cancelled, "rescued at the maximum attempts while in finalizing"
    bound = h.tuning.lease_seconds + h.tuning.poll_interval + LEASE_SLACK
    assert all_gone <= bound, f"images of ended jobs outlived lease + poll: {all_gone:.1f}s > {bound:.1f}s"
