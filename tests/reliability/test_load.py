"""Volume: a 10,000-job backlog through two listeners and two worker processes, and 1,000 INSERTs at once.

Both end with the invariant: each job done exactly once (one images row, one
object, one `done` transition), none claimed twice by the two listeners.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import psycopg
import pytest

from imagen import jobs
from tests.reliability.harness import Harness

pytestmark = pytest.mark.slow

MOCK = {"backend": "mock", "size": "16x16"}


def test_ten_thousand_job_backlog_two_listeners_two_workers_each_done_once(
    harness: Callable[..., Harness],
) -> None:
    # No fault here, so a long lease: it measures the pipeline, not rescue churn. The local
    # copy (two fsyncs per job) is off, as on a worker host that only syncs to Supabase.
    h = harness(lease_seconds=60, max_in_flight=256, extra={"IMAGEN_KEEP_LOCAL_COPY": "0"})
    ids = h.insert_backlog(10_000, MOCK, owners=10)
    h.start_workers(1, threads=4)
    h.start_workers(1, threads=4)
    listeners = [h.start_listener(), h.start_listener()]
    with h.timed("drain_s"):
        h.wait(lambda: h.unfinished() == 0, 180, "10,000 jobs terminal")
    first, last = h.query("SELECT min(claimed_at), max(finished_at) FROM imagen.jobs")[0]
    span = (last - first).total_seconds()
    claims = [p.tail(10**8).count(" claimed pickup_ms=") for p in listeners]
    h.figures.update(
        jobs_per_s=round(len(ids) / span, 1), claim_to_last_done_s=round(span, 1), claims_per_listener=claims
    )
    figures = h.finish(deadline=10)
    # A job claimed twice would carry attempt 2 and a second claim line.
    assert figures["jobs"] == 10_000 and figures["max_attempt"] == 1
    assert sum(claims) == 10_000 and min(claims) > 0, claims
    assert figures["regenerated_jobs"] == 0


def test_burst_of_1000_concurrent_inserts_each_done_once(harness: Callable[..., Harness]) -> None:
    h = harness(lease_seconds=30)
    h.start_workers(1, threads=8)
    h.start_listener()
    threads, per_thread = 20, 50
    inserted: list[uuid.UUID] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)
    lock = threading.Lock()

    def insert_as_owner() -> None:
        owner = uuid.uuid4()
        try:
            with psycopg.connect(h.db_url, autocommit=True) as conn:
                barrier.wait(timeout=30)
                for i in range(per_thread):
                    # One statement per job, as the UI does it: role authenticated with JWT claims.
                    job_id = jobs.submit_job(conn, owner, f"burst {i}", MOCK)
                    with lock:
                        inserted.append(job_id)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=insert_as_owner) for _ in range(threads)]
    started = time.monotonic()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(60)
    insert_s = time.monotonic() - started
    assert not errors, errors[:3]
    assert len(inserted) == threads * per_thread
    h.wait_terminal(inserted, 120)
    total_s = time.monotonic() - started
    pickup = h.query(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM claimed_at - created_at)),"
        " max(extract(epoch FROM claimed_at - created_at)) FROM imagen.jobs"
    )[0]
    h.figures.update(
        insert_s=round(insert_s, 2), inserts_per_s=round(len(inserted) / insert_s),
        all_done_s=round(total_s, 1), pickup_median_ms=round(float(pickup[0]) * 1000, 1),
        pickup_max_ms=round(float(pickup[1]) * 1000, 1),
    )  # fmt: skip
    figures = h.finish(deadline=10)
    assert figures["jobs"] == 1000 and figures["max_attempt"] == 1
