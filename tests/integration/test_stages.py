"""The stage bodies in-process against real PostgreSQL and Redis: fencing, idempotency, rescue."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

from imagen import jobs
from imagen.broker import (
    FINALIZE_ACTOR,
    FINALIZE_QUEUE,
    GENERATE_ACTOR,
    GENERATE_QUEUE,
    SYNC_ACTOR,
    SYNC_QUEUE,
    build_broker,
)
from imagen.config import Settings
from imagen.errors import TransientError, TransientStorageError
from imagen.handoff import handoff_key
from imagen.listener import SATURATED_POLL, SATURATED_POLL_MAX, Listener
from imagen.stages import (
    SYNC_TIME_LIMIT_S,
    StageContext,
    run_finalize,
    run_generate,
    run_sync,
)
from imagen.stages.lease import CANCEL_CHECK_S
from tests.integration.conftest import RecordingBroker
from tests.integration.rows import query, scalar
from tests.waiting import wait_until


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url, redis_url=redis_url, storage="local", storage_dir=tmp_path / "storage",
        output_dir=tmp_path / "out", listener_metrics_port=0, lease_seconds=600, max_attempts=3,
        job_test_options=True,
    )  # fmt: skip


@pytest.fixture
def ctx(settings: Settings) -> Any:
    context = StageContext(settings, RecordingBroker())
    yield context
    context.close()


def claim_one(db_url: str, prompt: str = "a cat", params: dict[str, Any] | None = None) -> jobs.Claim:
    with psycopg.connect(db_url, autocommit=True) as conn:
        jobs.submit_job(conn, uuid.uuid4(), prompt, params or {"backend": "mock", "size": "32x32"})
        (claim,) = jobs.claim_jobs(conn, 1)
    return claim


def test_redelivered_sync_message_writes_one_image_row_and_one_object(
    ctx: Any, db_url: str, tmp_path: Path
) -> None:
    claim = claim_one(db_url)
    job_id = str(claim.job_id)
    run_generate(ctx, job_id, claim.attempt)
    run_generate(ctx, job_id, claim.attempt)  # a redelivered generation overwrites the same hand-off
    run_sync(ctx, job_id, claim.attempt)
    run_sync(ctx, job_id, claim.attempt)  # redelivered after the row was written
    finals = [args for actor, args in ctx.broker.sent if actor == FINALIZE_ACTOR]
    assert len(finals) == 2 and finals[0] == finals[1], "both sync runs link the same image"
    assert scalar(db_url, "SELECT count(*) FROM imagen.images WHERE job_id = %s", claim.job_id) == 1
    assert len(list((tmp_path / "storage").rglob("*.png"))) == 1
    run_finalize(ctx, *finals[0])
    run_finalize(ctx, *finals[1])  # the second one is fenced out: the job is done already
    assert scalar(db_url, "SELECT status FROM imagen.jobs WHERE id = %s", claim.job_id) == "done"


def test_message_from_an_older_attempt_is_dropped_after_a_rescue(
    ctx: Any, db_url: str, settings: Settings
) -> None:
    claim = claim_one(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE imagen.jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", (claim.job_id,)
        )
        rescued = jobs.rescue_expired(conn, lease_seconds=settings.lease_seconds, max_attempts=3)
        assert [(r.status, r.attempt) for r in rescued] == [("pending", 1)]
        (again,) = jobs.claim_jobs(conn, 1)
    assert again.attempt == 2
    run_generate(ctx, str(claim.job_id), claim.attempt)  # the stale attempt-1 message
    assert ctx.broker.sent == []
    assert redis.Redis.from_url(settings.redis_url).exists(handoff_key(claim.job_id, 1)) == 0
    run_generate(ctx, str(claim.job_id), again.attempt)
    assert ctx.broker.sent == [(SYNC_ACTOR, (str(claim.job_id), 2))]


def test_expired_lease_is_requeued_and_fails_at_max_attempts(db_url: str, settings: Settings) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = jobs.submit_job(conn, uuid.uuid4(), "stuck", {})
        for attempt in (1, 2, 3):
            (claim,) = jobs.claim_jobs(conn, 1)
            assert claim.attempt == attempt
            # A worker started it, then went silent. Just inside the lease: untouched.
            conn.execute(
                "UPDATE imagen.jobs SET stage = 'generating', heartbeat_at = now() - interval '590 seconds'"
                " WHERE id = %s",
                (job_id,),
            )
            assert jobs.rescue_expired(conn, lease_seconds=600, max_attempts=3) == []
            conn.execute(
                "UPDATE imagen.jobs SET heartbeat_at = now() - interval '601 seconds' WHERE id = %s",
                (job_id,),
            )
            (rescued,) = jobs.rescue_expired(conn, lease_seconds=600, max_attempts=3)
            assert rescued.status == ("failed" if attempt == 3 else "pending")
        row = jobs.get_job(conn, job_id)
    assert row is not None and row["status"] == "failed"
    assert row["error"].startswith(
        "gave up after 3 attempts: the job stopped making progress in stage generating (no heartbeat for 600"
    )


def test_listener_rescue_requeues_and_forwards_expired_job(db_url: str, settings: Settings) -> None:
    broker = RecordingBroker()
    listener = Listener(settings, broker=broker, metrics_port=0)
    listener._connect()
    claim = claim_one(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE imagen.jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", (claim.job_id,)
        )
    listener.rescue()
    listener._close()
    assert broker.sent == [(GENERATE_ACTOR, (str(claim.job_id), 2))]


def insert_jobs(
    conn: psycopg.Connection[Any],
    owners: list[uuid.UUID],
    n: int,
    prompt: str = "job",
    status: str = "pending",
) -> None:
    """n jobs in one INSERT, spread round-robin over the owners, prompts `{prompt} {i}`."""
    conn.execute(
        "INSERT INTO imagen.jobs (owner_user_id, prompt, status)"
        " SELECT (%s::uuid[])[1 + i %% %s], %s || ' ' || i, %s FROM generate_series(1, %s) i",
        (owners, len(owners), prompt, status, n),
    )


def plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    """An EXPLAIN (FORMAT JSON) plan node and every node under it."""
    return [node, *(n for child in node.get("Plans", []) for n in plan_nodes(child))]


def job_rows_read(plan: dict[str, Any]) -> int:
    """The imagen.jobs rows a plan read: the rows its scans of jobs returned and those they filtered out."""
    return sum(
        n["Actual Rows"] * n["Actual Loops"] + n.get("Rows Removed by Filter", 0)
        for n in plan_nodes(plan)
        if n.get("Relation Name") == "jobs"
    )


def test_two_listeners_claim_each_of_1000_jobs_exactly_once(db_url: str, settings: Settings) -> None:
    owners = [uuid.uuid4() for _ in range(7)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        insert_jobs(conn, owners, 1000)
    brokers = [build_broker(settings), build_broker(settings)]
    tuned = settings.model_copy(update={"max_in_flight": 10_000, "claim_batch": 10})
    listeners = [Listener(tuned, broker=b, metrics_port=0) for b in brokers]
    for listener in listeners:
        listener._connect()
    barrier = threading.Barrier(2)

    def pending() -> int:
        return int(scalar(db_url, "SELECT count(*) FROM imagen.jobs WHERE status = 'pending'"))

    errors: list[BaseException] = []

    def drain(listener: Listener) -> None:
        try:
            barrier.wait()
            # A drain that finds every candidate locked by the other listener claims nothing and
            # returns; a real listener waits for its next wake. Both keep going until the table is empty.
            while pending():
                listener.drain()
        except BaseException as exc:  # the test thread re-raises it: a thread's error is not a pass
            errors.append(exc)
            raise

    threads = [threading.Thread(target=drain, args=(lst,)) for lst in listeners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a listener still draining after 60 s"
    if errors:
        raise errors[0]
    for listener in listeners:
        listener._close()
    client = redis.Redis.from_url(settings.redis_url)
    import dramatiq

    messages = [dramatiq.Message.decode(raw) for raw in client.hvals("dramatiq:imagen-generate.msgs")]
    forwarded = Counter(m.args[0] for m in messages)
    assert len(forwarded) == 1000 and set(forwarded.values()) == {1}
    assert {m.args[1] for m in messages} == {1}
    assert sum(lst.stats.claims for lst in listeners) == 1000
    assert all(lst.stats.claims > 0 for lst in listeners), "both listeners took part"
    assert scalar(db_url, "SELECT count(*) FROM imagen.jobs WHERE status = 'running' AND attempt = 1") == 1000


def finish_running(db_url: str, n: int) -> None:
    """End n running jobs, as workers would."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE imagen.jobs SET status = 'done', finished_at = now() WHERE id IN"
            " (SELECT id FROM imagen.jobs WHERE status = 'running' ORDER BY id LIMIT %s)",
            (n,),
        )


def listener_over_a_backlog(
    db_url: str, settings: Settings, clock: Callable[[], float] = time.monotonic
) -> Listener:
    """A connected listener capped at 80 in flight (a refill is 10), over 200 pending jobs."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        insert_jobs(conn, [uuid.uuid4()], 200)
    tuned = settings.model_copy(update={"max_in_flight": 80, "claim_batch": 100})
    listener = Listener(tuned, broker=RecordingBroker(), metrics_port=0, clock=clock)
    listener._connect()
    return listener


def test_listener_at_the_in_flight_cap_claims_a_refill_at_a_time(
    db_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 80 in flight: a refill is 80 // 8 = 10 jobs. Every claim is a scan of the pending rows and a
    # round trip to Redis, so the few jobs that finish while a batch is forwarded must not each
    # cost one: workers finish 3 jobs during every claim here.
    claim_jobs = jobs.claim_jobs
    sizes = []

    def claim_while_3_finish(conn: Any, limit: int, **kw: Any) -> list[jobs.Claim]:
        claims = claim_jobs(conn, limit, **kw)
        sizes.append(len(claims))
        finish_running(db_url, 3)
        return claims

    claim_within_cap = jobs.claim_within_cap

    def capped_claim_while_3_finish(conn: Any, limit: int, cap: int) -> tuple[list[jobs.Claim], int | None]:
        claims, running = claim_within_cap(conn, limit, cap)
        sizes.append(len(claims))
        finish_running(db_url, 3)
        return claims, running

    monkeypatch.setattr(jobs, "claim_jobs", claim_while_3_finish)
    monkeypatch.setattr(jobs, "claim_within_cap", capped_claim_while_3_finish)
    listener = listener_over_a_backlog(db_url, settings)
    try:
        assert listener.drain() == 80, "claims up to the cap, then stops"
        assert listener.drain() == 0, "3 free slots are not worth a claim"
        finish_running(db_url, 7)
        assert listener.drain() == 10, "a refill's worth is"
    finally:
        listener._close()
    assert sizes == [80, 10]


def test_listener_at_the_cap_counts_again_at_the_pace_jobs_finish(db_url: str, settings: Settings) -> None:
    # Each check at the cap counts the running rows. A fixed 10 ms tick made that a hundred counts
    # a second however slowly jobs finished; the wait now follows how fast slots free up.
    clock = [1000.0]
    listener = listener_over_a_backlog(db_url, settings, clock=lambda: clock[0])
    waits = []
    try:
        listener.drain()
        waits.append(listener.gate.wait)  # just filled: check again soon
        for _ in range(6):  # nothing finishes: back off, to a bound
            clock[0] += listener.gate.wait
            listener.drain()
            waits.append(listener.gate.wait)
        finish_running(db_url, 5)  # 5 in 0.5 s: 10 a second, 5 more make a refill: 0.5 s, capped
        clock[0] += 0.5
        listener.drain()
        waits.append(listener.gate.wait)
        finish_running(db_url, 2)  # 2 in 0.1 s: 20 a second, 3 more: 0.15 s
        clock[0] += 0.1
        listener.drain()
        waits.append(listener.gate.wait)
    finally:
        listener._close()
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


def test_listener_on_a_steady_backlog_counts_once_per_refill(
    db_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers finish 100 jobs a second. Once a refill has shown that pace, a claim that fills the
    # cap waits for the next refill's worth (10 jobs: 0.1 s), so the count that follows finds room
    # and claims: one count per claim, not a count right after the claim and another once it fits.
    clock = [1000.0]
    count_running = jobs.count_running
    counts = [0]

    def counting(conn: Any) -> int:
        counts[0] += 1
        return count_running(conn)

    monkeypatch.setattr(jobs, "count_running", counting)
    listener = listener_over_a_backlog(db_url, settings, clock=lambda: clock[0])
    claimed, waits = [], []
    try:
        claimed.append(listener.drain())  # fills the cap; no pace known yet
        waits.append(listener.gate.wait)
        for _ in range(4):
            clock[0] += 0.1
            finish_running(db_url, 10)
            counts[0] = 0
            claimed.append(listener.drain())
            waits.append(listener.gate.wait)
            assert counts[0] == 1, "one count, then the claim"
    finally:
        listener._close()
    assert claimed == [80, 10, 10, 10, 10]
    assert waits == pytest.approx([SATURATED_POLL, 0.1, 0.1, 0.1, 0.1])


def test_claim_order_interleaves_owners(db_url: str) -> None:
    big, small = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(db_url, autocommit=True) as conn:
        insert_jobs(conn, [big], 500, prompt="a")
        conn.execute("INSERT INTO imagen.jobs (owner_user_id, prompt) VALUES (%s, 'b')", (small,))
        first = jobs.claim_jobs(conn, 10)
    assert small in [c.owner_user_id for c in first[:2]]


def test_claim_reads_the_rows_it_takes_not_the_backlog_even_with_stale_statistics(db_url: str) -> None:
    # A burst of 3,000 jobs on a table whose statistics (last ANALYZE) show only done jobs: the
    # plan the server caches for the claim must still lock the chosen rows by primary key. The
    # old query's plan walked every pending row for each claim (90 ms per claim at 10,000).
    owners = [uuid.uuid4() for _ in range(10)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        insert_jobs(conn, owners, 300, prompt="old", status="done")
        conn.execute("ANALYZE imagen.jobs")
        insert_jobs(conn, owners, 3000, prompt="new")
        claim = jobs.CLAIM.replace("%(limit)s", "$1").replace("%(max_owners)s", "$2")
        conn.execute(f"PREPARE claim(int, int) AS {claim}")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        with conn.transaction(force_rollback=True):
            row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim(40, 1000)").fetchone()
    assert row is not None

    plan = row[0][0]["Plan"]
    assert plan["Actual Rows"] == 40, "claimed 40"
    assert job_rows_read(plan) < 1000, f"read {job_rows_read(plan)} job rows to claim 40 of 3,000"


@pytest.mark.parametrize("plan_mode", ["force_generic_plan", "force_custom_plan"])
def test_a_burst_from_many_owners_is_claimed_in_index_order_whatever_the_statistics_say(
    db_url: str, plan_mode: str
) -> None:
    # The shape of `imagen bench --scale`'s last step, smaller: a burst from 300 owners on a table
    # whose statistics (the last ANALYZE) show only done jobs. Before sql/015 the planner could read
    # every pending row through jobs_pending_idx and sort them for each claim (40,000-100,000 blocks
    # a claim at 1,000 x 100, until the next ANALYZE); now the claim can only walk jobs_claim_idx.
    owners = [uuid.uuid4() for _ in range(300)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        insert_jobs(conn, owners[:10], 2000, prompt="old", status="done")
        conn.execute("ANALYZE imagen.jobs")
        insert_jobs(conn, owners, 6000, prompt="burst")
        claim = jobs.CLAIM.replace("%(limit)s", "$1").replace("%(max_owners)s", "$2")
        conn.execute(f"PREPARE claim(int, int) AS {claim}")
        conn.execute(f"SET plan_cache_mode = {plan_mode}")
        with conn.transaction(force_rollback=True):
            row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim(100, 1000)").fetchone()
        # The per-owner lookups keep their index: the insert trigger's owner round.
        owner_plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT j.fair_round FROM imagen.jobs j WHERE j.status = 'pending'"
                " AND j.owner_user_id = %s ORDER BY j.fair_round DESC LIMIT 1",
                (owners[0],),
            ).fetchall()
        )
    assert row is not None

    plan = plan_nodes(row[0][0]["Plan"])
    read = job_rows_read(plan[0])
    assert plan[0]["Actual Rows"] == 100, "claimed 100"
    assert {n.get("Index Name") for n in plan} & {"jobs_pending_idx"} == set(), plan
    assert "jobs_claim_idx" in {n.get("Index Name") for n in plan}
    assert read < 1000, f"read {read} job rows to claim 100 of 6,000"
    assert "jobs_pending_idx" in owner_plan, owner_plan


def test_a_bulk_insert_after_an_empty_analyze_reads_no_earlier_row_per_inserted_row(db_url: str) -> None:
    # A fresh database's first bulk import: the last ANALYZE saw no job, so the fair-round
    # trigger's cached lookups were sequential scans and each row read every row inserted before
    # it (20,000 jobs in one INSERT: 31 s instead of 0.3 s). Since sql/017 they walk their index.
    owners = [uuid.uuid4() for _ in range(3)]
    with psycopg.connect(db_url) as conn:
        conn.execute("ANALYZE imagen.jobs")
        conn.commit()
        insert_jobs(conn, owners, 3000)
        # This transaction's own counts, before any flush to the shared statistics.
        row = conn.execute(
            "SELECT seq_scan, seq_tup_read FROM pg_stat_xact_user_tables WHERE relid = 'imagen.jobs'::regclass"
        ).fetchone()
        entries = conn.execute(
            "SELECT sum(pg_stat_get_xact_tuples_returned(indexrelid)) FROM pg_index"
            " WHERE indrelid = 'imagen.jobs'::regclass"
        ).fetchone()
        rounds = conn.execute(
            "SELECT count(DISTINCT fair_round), max(fair_round) FROM imagen.jobs WHERE status = 'pending'"
        ).fetchone()
    assert row is not None and entries is not None
    seq_scans, seq_read = row
    assert seq_scans == 0, f"{seq_scans} sequential scans of imagen.jobs reading {seq_read} rows"
    assert entries[0] <= 2 * 3000, f"{entries[0]} index entries read for 3,000 rows' 6,000 lookups"
    assert rounds == (1000, 999), "each owner's next job one round after its last"


def _fenced_writes(job: Any) -> dict[str, dict[str, Any]]:
    """Every fenced write of a running job (`status = 'running' AND attempt = ...`), with parameters."""
    from imagen.store.postgres_stages import image_params, usage_params
    from imagen.store.rows import ImageRow

    one = {"id": job.job_id, "attempt": job.attempt}
    image = ImageRow(
        job_id=job.job_id, bucket="b", path=f"jobs/{job.job_id}.png", mime="image/png", width=1, height=1,
        bytes=1, prompt="p", backend="mock", model="m", params={},
    )  # fmt: skip
    row = {**image_params(image), "job_id": job.job_id, "attempt": job.attempt}
    chained = {**row, **usage_params(None), "sync_seconds": 0.0}
    return {
        "begin_stage": {**one, "stage": "generating"},
        "heartbeat_many": {"ids": [job.job_id], "attempts": [job.attempt]},
        "still_running": {"ids": [job.job_id], "attempts": [job.attempt]},
        "note_transient": {**one, "error": "e"},
        "fail_job": {**one, "error": "e"},
        "release_claim": one,
        "begin_sync": one,
        "record_job_image": row,
        "record_and_complete": chained,
    }


def test_a_stage_write_finds_its_job_by_primary_key_whatever_the_statistics_say(db_url: str) -> None:
    # Statistics from a moment with no job running (an ANALYZE between bursts), then 200 running:
    # before sql/016 every fenced write took jobs_running_idx, a one-page index by those statistics,
    # and walked all 200 running rows to find its own (170-240 blocks a write in `bench --scale`).
    from imagen.store.queries import QUERIES

    owners = [uuid.uuid4() for _ in range(20)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        insert_jobs(conn, owners, 2000, prompt="old", status="done")
        conn.execute("ANALYZE imagen.jobs")
        insert_jobs(conn, owners, 200, prompt="burst")
        claims = jobs.claim_jobs(conn, 200)
        assert len(claims) == 200
        plans = {}
        for name, params in _fenced_writes(claims[100]).items():
            with conn.transaction(force_rollback=True):
                row = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES[name], params).fetchone()
            assert row is not None
            plans[name] = row[0][0]["Plan"]
        # The generic plan too (after five executions psycopg prepares the statement, and the server
        # may keep one plan for every job).
        begin = QUERIES["begin_stage"].replace("%(stage)s", "$1").replace("%(id)s", "$2")
        conn.execute("PREPARE begin_generic(text, uuid, smallint) AS " + begin.replace("%(attempt)s", "$3"))
        conn.execute("SET plan_cache_mode = force_generic_plan")
        with conn.transaction(force_rollback=True):
            row = conn.execute(
                sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE begin_generic('generating', {}, {})").format(
                    claims[100].job_id, claims[100].attempt
                )
            ).fetchone()
        assert row is not None
        plans["begin_stage, generic plan"] = row[0][0]["Plan"]
        conn.execute("RESET plan_cache_mode")
        count = "\n".join(r[0] for r in conn.execute("EXPLAIN " + QUERIES["count_running"]).fetchall())

    for name, plan in plans.items():
        on_jobs = [n for n in plan_nodes(plan) if n.get("Relation Name") == "jobs" and "Index Name" in n]
        assert on_jobs, f"{name}: no index scan of imagen.jobs: {plan}"
        assert {n["Index Name"] for n in on_jobs} == {"jobs_pkey"}, f"{name}: {on_jobs}"
        walked = sum(n.get("Rows Removed by Filter", 0) for n in plan_nodes(plan))
        assert walked == 0, f"{name} read {walked} other jobs' rows to find its own"
    # The in-flight count still reads only the running rows, through the index they are in.
    assert "jobs_running_idx" in count, count


def test_rescue_of_a_job_no_worker_started_never_fails_it(db_url: str) -> None:
    """Workers down (or Redis lost the message): a 'queued' job cycles back to pending, not to failed."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = jobs.submit_job(conn, uuid.uuid4(), "waiting for workers", {})
        for _ in range(5):
            (claim,) = jobs.claim_jobs(conn, 1)
            conn.execute(
                "UPDATE imagen.jobs SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", (job_id,)
            )
            (rescued,) = jobs.rescue_expired(conn, lease_seconds=600, max_attempts=3)
            assert rescued.status == "pending"
        assert claim.attempt == 5


class FlakyStorage:
    """Wraps the real storage: runs `before_put` first, and fails the first `failures` uploads (503)."""

    def __init__(self, inner: Any, failures: int = 0, before_put: Any = None) -> None:
        self.inner, self.failures, self.before_put, self.puts = inner, failures, before_put, 0
        self.bucket = inner.bucket

    def put(self, path: str, data: bytes, mime: str) -> Any:
        self.puts += 1
        if self.before_put:
            self.before_put()
        if self.failures:
            self.failures -= 1
            raise TransientStorageError("storage upload: 503 Service Unavailable")
        return self.inner.put(path, data, mime)

    def delete(self, path: str) -> bool:
        return bool(self.inner.delete(path))


def test_chained_worker_generates_syncs_and_completes_in_one_message_without_hand_off(
    ctx: Any, db_url: str, settings: Settings, tmp_path: Path
) -> None:
    ctx.chain_for_worker(None)  # a worker on every queue
    claim = claim_one(db_url)
    run_generate(ctx, str(claim.job_id), claim.attempt)
    assert ctx.broker.sent == [], "no sync or finalize message"
    assert redis.Redis.from_url(settings.redis_url).exists(handoff_key(claim.job_id, 1)) == 0
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = jobs.get_job(conn, claim.job_id)
    assert row is not None and row["status"] == "done" and row["stage"] is None
    assert scalar(db_url, "SELECT id FROM imagen.images WHERE job_id = %s", claim.job_id) == row["image_id"]
    stamps = row["stage_times"]
    assert stamps["generating"] <= stamps["syncing"] <= stamps["done"]
    run_generate(ctx, str(claim.job_id), claim.attempt)  # redelivered after done: fenced out
    assert scalar(db_url, "SELECT count(*) FROM imagen.images WHERE job_id = %s", claim.job_id) == 1
    assert scalar(db_url, "SELECT count(*) FROM imagen.usage WHERE job_id = %s", claim.job_id) == 1
    assert len(list((tmp_path / "storage").rglob("*.png"))) == 1
    # The call's usage row was written by the statement that ended the job: one commit, not two.
    same = "SELECT u.xmin = j.xmin FROM imagen.usage u JOIN imagen.jobs j ON j.id = u.job_id WHERE j.id = %s"
    assert scalar(db_url, same, claim.job_id) is True


@pytest.mark.parametrize("fail", ["permanent", "transient"])
def test_chained_job_whose_provider_fails_has_its_usage_row_before_its_state_changes(
    ctx: Any, db_url: str, monkeypatch: pytest.MonkeyPatch, fail: str
) -> None:
    # Whoever sees the job failed (or its retry noted) must also see what the call cost.
    usage = "SELECT count(*) FROM imagen.usage WHERE job_id = %s AND NOT ok"
    seen = []
    for name in ("fail_job", "note_transient"):
        original = getattr(ctx.store, name)

        def checking(job_id: Any, *args: Any, _original: Any = original) -> Any:
            seen.append(scalar(db_url, usage, job_id))
            return _original(job_id, *args)

        monkeypatch.setattr(ctx.store, name, checking)
    ctx.chain_for_worker(None)
    claim = claim_one(db_url, params={"backend": "mock", "fail": fail})
    if fail == "transient":
        with pytest.raises(TransientError):
            run_generate(ctx, str(claim.job_id), claim.attempt)
    else:
        run_generate(ctx, str(claim.job_id), claim.attempt)
    assert seen == [1]
    assert scalar(db_url, usage, claim.job_id) == 1


def test_chained_job_whose_last_statement_fails_keeps_its_usage_row_and_its_image(
    ctx: Any, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The usage row rides with the job's last statement; if that statement fails (here the
    # connection drops), the row is written on its own and the sync stage takes the image on.
    record = ctx.store.record_job_image
    calls = []

    def dropped_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("usage"))
        if len(calls) == 1:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return record(*args, **kwargs)

    monkeypatch.setattr(ctx.store, "record_job_image", dropped_once)
    ctx.chain_for_worker(None)
    claim = claim_one(db_url)
    job_id = str(claim.job_id)
    run_generate(ctx, job_id, claim.attempt)
    assert calls[0] is not None, "the usage row was sent with the job's end"
    usage = "SELECT count(*) FROM imagen.usage WHERE job_id = %s AND ok"
    assert scalar(db_url, usage, claim.job_id) == 1, "and written on its own when that failed"
    assert ctx.broker.sent == [(SYNC_ACTOR, (job_id, 1))]
    run_sync(ctx, job_id, claim.attempt)
    (finalize,) = [args for actor, args in ctx.broker.sent if actor == FINALIZE_ACTOR]
    run_finalize(ctx, *finalize)
    assert scalar(db_url, "SELECT status FROM imagen.jobs WHERE id = %s", claim.job_id) == "done"
    assert scalar(db_url, "SELECT count(*) FROM imagen.usage WHERE job_id = %s", claim.job_id) == 1


def test_chained_upload_failure_hands_the_image_to_the_sync_stage_instead_of_regenerating(
    ctx: Any, db_url: str, settings: Settings
) -> None:
    ctx.chain_for_worker(None)
    ctx.__dict__["storage"] = FlakyStorage(ctx.storage, failures=1)
    claim = claim_one(db_url)
    job_id = str(claim.job_id)
    run_generate(ctx, job_id, claim.attempt)
    assert ctx.broker.sent == [(SYNC_ACTOR, (job_id, 1))]
    assert ctx.broker.delays == [settings.retry_min_backoff_ms], "sent on after a backoff, not at once"
    assert redis.Redis.from_url(settings.redis_url).exists(handoff_key(claim.job_id, 1)) == 1
    assert "503" in scalar(db_url, "SELECT last_error FROM imagen.jobs WHERE id = %s", claim.job_id)
    run_sync(ctx, job_id, claim.attempt)
    (finalize,) = [args for actor, args in ctx.broker.sent if actor == FINALIZE_ACTOR]
    run_finalize(ctx, *finalize)
    assert scalar(db_url, "SELECT status FROM imagen.jobs WHERE id = %s", claim.job_id) == "done"
    assert scalar(db_url, "SELECT count(*) FROM imagen.usage WHERE job_id = %s", claim.job_id) == 1, (
        "the provider was called once"
    )


def test_job_cancelled_during_a_chained_upload_keeps_no_image_or_object(
    ctx: Any, db_url: str, tmp_path: Path
) -> None:
    ctx.chain_for_worker(None)
    claim = claim_one(db_url)

    def cancel() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            assert jobs.cancel_job(conn, claim.job_id)

    ctx.__dict__["storage"] = FlakyStorage(ctx.storage, before_put=cancel)
    run_generate(ctx, str(claim.job_id), claim.attempt)
    assert scalar(db_url, "SELECT status FROM imagen.jobs WHERE id = %s", claim.job_id) == "cancelled"
    assert scalar(db_url, "SELECT count(*) FROM imagen.images WHERE job_id = %s", claim.job_id) == 0
    assert not list((tmp_path / "storage").rglob("*.png")), "the uploaded object was removed"
    assert ctx.broker.sent == []
    usage = "SELECT count(*) FROM imagen.usage WHERE job_id = %s AND ok"
    assert scalar(db_url, usage, claim.job_id) == 1, "the provider call was made: its usage row stays"


@pytest.mark.parametrize(
    ("enabled", "queues", "chained"),
    [
        (True, None, True),
        (True, {GENERATE_QUEUE, SYNC_QUEUE, FINALIZE_QUEUE}, True),
        (True, {GENERATE_QUEUE}, False),
        (True, {GENERATE_QUEUE, SYNC_QUEUE}, False),
        (False, None, False),
    ],
)
def test_stages_chain_only_on_a_worker_that_consumes_sync_and_finalize(
    settings: Settings, enabled: bool, queues: set[str] | None, chained: bool
) -> None:
    context = StageContext(settings.model_copy(update={"chain_stages": enabled}), RecordingBroker())
    context.chain_for_worker(queues)
    assert context.chain_stages is chained


def test_listener_puts_a_batch_back_to_pending_when_forwarding_fails(db_url: str, settings: Settings) -> None:
    class DownBroker(RecordingBroker):
        def enqueue_many(self, messages: list[Any]) -> list[Any]:
            raise redis.ConnectionError("Connection refused")

    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(3):
            jobs.submit_job(conn, uuid.uuid4(), f"job {i}", {})
    listener = Listener(settings, broker=DownBroker(), metrics_port=0)
    listener._connect()
    try:
        assert listener.drain() == 3
    finally:
        listener._close()
    assert listener.stats.forward_failures == 3 and listener.stats.claims == 0
    rows = sorted(query(db_url, "SELECT status, attempt, stage FROM imagen.jobs"))
    assert rows == [("pending", 0, None)] * 3, "released with the attempt they had"


def test_generation_that_used_most_of_its_time_limit_hands_the_upload_to_the_sync_stage(
    db_url: str, settings: Settings
) -> None:
    # A generation limit under the sync stage's own: chaining could leave the upload too little time.
    tight = settings.model_copy(update={"generate_time_limit": SYNC_TIME_LIMIT_S - 1})
    context = StageContext(tight, RecordingBroker())
    context.chain_for_worker(None)
    try:
        claim = claim_one(db_url)
        run_generate(context, str(claim.job_id), claim.attempt)
    finally:
        context.close()
    assert context.broker.sent == [(SYNC_ACTOR, (str(claim.job_id), 1))]
    assert redis.Redis.from_url(settings.redis_url).exists(handoff_key(claim.job_id, 1)) == 1


def _generating_in_thread(ctx: Any, claim: jobs.Claim) -> threading.Thread:
    def generate() -> None:
        with contextlib.suppress(TransientError):  # re-raised for Dramatiq's retries: none here
            run_generate(ctx, str(claim.job_id), claim.attempt)

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    return thread


def test_a_cancelled_jobs_long_call_is_abandoned_within_the_cancel_check(db_url: str, ctx: Any) -> None:
    """Cancelling frees the worker thread of a job in a ten-minute call within CANCEL_CHECK_S (1 s),
    not when the call ends; the abandoned call's usage row says so, and the job keeps no image."""
    claim = claim_one(db_url, params={"backend": "mock", "delay_ms": 600_000, "size": "16x16"})
    thread = _generating_in_thread(ctx, claim)
    wait_until(
        lambda: scalar(db_url, "SELECT stage FROM imagen.jobs WHERE id = %s", claim.job_id) == "generating",
        timeout=10,
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert jobs.cancel_job(conn, claim.job_id)
    cancelled = time.monotonic()
    thread.join(timeout=CANCEL_CHECK_S + 5)
    assert not thread.is_alive(), "the call still holds its thread"
    assert time.monotonic() - cancelled < CANCEL_CHECK_S + 5
    assert scalar(db_url, "SELECT status FROM imagen.jobs WHERE id = %s", claim.job_id) == "cancelled"
    usage = query(db_url, "SELECT ok, error FROM imagen.usage WHERE job_id = %s", claim.job_id)
    assert usage == [(False, "JobGone: the job was cancelled or taken over while its call ran")]
    assert ctx.broker.sent == [] and scalar(db_url, "SELECT count(*) FROM imagen.images") == 0


class _StuckBackend:
    """A provider call that no stop check reaches (a blocking C call): only the lease can rescue it."""

    name = "mock"
    interruptible = True

    def __init__(self) -> None:
        self.release = threading.Event()

    def default_model(self) -> str:
        return "stuck"

    def generate(self, request: Any) -> Any:
        self.release.wait(30)
        raise TransientError("released")


def test_no_heartbeat_for_a_stage_past_its_time_limit(db_url: str, settings: Settings) -> None:
    """A stage stuck past its time limit stops refreshing its lease, so the rescue can take the job back."""
    short = settings.model_copy(
        update={"lease_seconds": 2.0, "generate_time_limit": 3.0, "provider_timeout": 2.0}
    )
    context = StageContext(short, RecordingBroker())
    stuck = _StuckBackend()
    context.backends["mock"] = stuck
    claim = claim_one(db_url)
    thread = _generating_in_thread(context, claim)

    def heartbeat() -> Any:
        return scalar(db_url, "SELECT heartbeat_at FROM imagen.jobs WHERE id = %s", claim.job_id)

    try:
        first = heartbeat()
        wait_until(lambda: heartbeat() > first, timeout=5, message="a heartbeat within the limit")
        time.sleep(2.5)  # past our own deadline (1.5 s after the start, before Dramatiq's 3 s)
        last = heartbeat()
        time.sleep(1.5)  # three heartbeat intervals (0.5 s)
        assert heartbeat() == last, "a stage past its time limit kept its lease fresh"
        with psycopg.connect(db_url, autocommit=True) as conn:
            rescued = jobs.rescue_expired(conn, lease_seconds=1.0, max_attempts=3)
        assert [(r.job_id, r.status) for r in rescued] == [(claim.job_id, "pending")]
    finally:
        stuck.release.set()
        thread.join(timeout=10)
        context.close()
