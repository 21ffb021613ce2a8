"""The job row: claim, stage, heartbeat, complete, fail, rescue, cancel, retry.

The SQL of the job row lives here, kept together as procrastinate keeps its
queries; the statements that write or discard a job's image row under its fence
are in `imagen.store.postgres_stages`. Every write a stage makes is fenced on `status =
'running' AND attempt = <the message's attempt>`: a function returns False (or
None) when the fence fails, and the caller drops the message. Every write is one
statement run by `execute_once`, so it is committed when the function returns,
unless the caller holds a transaction open, which it then joins.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

Conn = psycopg.Connection[Any]

# Fair claim: a loose index scan finds the owners with pending jobs, each owner
# contributes its oldest rows, and the batch takes every owner's first job before
# anyone's second. FOR UPDATE SKIP LOCKED makes concurrent listeners take disjoint rows.
CLAIM = """
WITH RECURSIVE owners(owner, n) AS (
    (SELECT owner_user_id, 1 FROM imagen.jobs WHERE status = 'pending' ORDER BY owner_user_id LIMIT 1)
    UNION ALL
    SELECT (SELECT j.owner_user_id FROM imagen.jobs j
            WHERE j.status = 'pending' AND j.owner_user_id > o.owner
            ORDER BY j.owner_user_id LIMIT 1), o.n + 1
    FROM owners o WHERE o.owner IS NOT NULL AND o.n < %(max_owners)s
),
candidates AS (
    SELECT c.id, c.created_at, c.owner_rank
    FROM owners o
    CROSS JOIN LATERAL (
        SELECT j.id, j.created_at, row_number() OVER (ORDER BY j.created_at, j.id) AS owner_rank
        FROM imagen.jobs j
        WHERE j.status = 'pending' AND j.owner_user_id = o.owner
        ORDER BY j.created_at, j.id
        LIMIT %(limit)s
    ) c
    WHERE o.owner IS NOT NULL
),
chosen AS (
    SELECT id, owner_rank FROM candidates ORDER BY owner_rank, created_at, id LIMIT %(limit)s
),
picked AS (
    -- The chosen rows, locked through the primary key and nothing else: with the status test
    -- here, a plan made while the statistics showed no pending rows (a burst on a table of done
    -- jobs) walked every pending row for each claim. The lock returns the row as it is now, so
    -- a row another claim took meanwhile shows its new status and is left out below.
    SELECT j.id, j.status FROM imagen.jobs j
    WHERE j.id = ANY (ARRAY(SELECT id FROM chosen))
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE imagen.jobs j
SET status = 'running', stage = 'queued', attempt = j.attempt + 1, claimed_at = now(),
    heartbeat_at = now(), error = NULL, last_error = NULL,
    stage_times = jsonb_build_object('queued', now())
FROM picked JOIN chosen ON chosen.id = picked.id
WHERE j.id = picked.id AND picked.status = 'pending'
RETURNING j.id, j.attempt, j.owner_user_id, j.created_at, j.claimed_at, chosen.owner_rank,
          coalesce(j.pending_at, j.created_at)
"""

COUNT_RUNNING = "SELECT count(*) FROM imagen.jobs WHERE status = 'running'"

RELEASE = """
UPDATE imagen.jobs
SET status = 'pending', stage = NULL, attempt = attempt - 1, claimed_at = NULL, heartbeat_at = NULL
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
"""

# A job still 'queued' never reached a worker (workers down, or Redis lost its messages):
# it goes back to pending however many attempts it has, so an outage fails nothing.
RESCUE = """
WITH expired AS (
    SELECT id FROM imagen.jobs
    WHERE status = 'running' AND heartbeat_at < now() - make_interval(secs => %(lease)s)
    ORDER BY heartbeat_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE imagen.jobs j
SET status = CASE WHEN j.attempt >= %(max_attempts)s AND j.stage IS DISTINCT FROM 'queued'
                  THEN 'failed' ELSE 'pending' END,
    error = CASE WHEN j.attempt >= %(max_attempts)s AND j.stage IS DISTINCT FROM 'queued'
        THEN format('gave up after %%s attempts: the job stopped making progress in stage %%s '
                    '(no heartbeat for %%s s)%%s', j.attempt, coalesce(j.stage, 'queued'), %(lease)s,
                    coalesce('; last error: ' || j.last_error, ''))
        ELSE j.error END,
    -- Back to pending: pickup counts from now, and the jobs_notify_pending trigger wakes the listeners.
    pending_at = CASE WHEN j.attempt >= %(max_attempts)s AND j.stage IS DISTINCT FROM 'queued'
                      THEN j.pending_at ELSE now() END,
    stage = NULL, heartbeat_at = NULL
FROM expired
WHERE j.id = expired.id
RETURNING j.id, j.status, j.attempt
"""

BEGIN_STAGE = """
UPDATE imagen.jobs
SET stage = %(stage)s, heartbeat_at = now(),
    stage_times = stage_times || jsonb_build_object(%(stage)s::text, now())
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id, owner_user_id, prompt, params::text, attempt, created_at, claimed_at
"""

HEARTBEAT_MANY = """
UPDATE imagen.jobs j SET heartbeat_at = now()
FROM unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS b(id, attempt)
WHERE j.id = b.id AND j.attempt = b.attempt AND j.status = 'running'
"""

STILL_RUNNING = """
SELECT j.id::text, j.attempt FROM imagen.jobs j
JOIN unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS b(id, attempt) ON j.id = b.id AND j.attempt = b.attempt
WHERE j.status = 'running'
"""

NOTE_TRANSIENT = """
UPDATE imagen.jobs SET last_error = %(error)s, heartbeat_at = now()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
"""

FAIL = """
UPDATE imagen.jobs SET status = 'failed', error = %(error)s, stage = NULL
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
"""

COMPLETE = """
UPDATE imagen.jobs
SET status = 'done', image_id = %(image_id)s, stage = NULL, error = NULL, last_error = NULL,
    stage_times = stage_times || jsonb_build_object('done', now())
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
"""

STATE = "SELECT status, attempt FROM imagen.jobs WHERE id = %(id)s"

CANCEL = """
UPDATE imagen.jobs SET status = 'cancelled'
WHERE id = %(id)s AND status IN ('pending', 'running')
RETURNING status
"""

RETRY = """
UPDATE imagen.jobs
SET status = 'pending', stage = NULL, error = NULL, last_error = NULL, image_id = NULL,
    claimed_at = NULL, heartbeat_at = NULL, finished_at = NULL, stage_times = '{}', pending_at = now()
WHERE id = %(id)s AND status IN ('failed', 'cancelled')
RETURNING status
"""


@dataclass(frozen=True)
class Claim:
    """A job the listener took: what goes into the generation message."""

    job_id: UUID
    attempt: int
    owner_user_id: UUID
    created_at: datetime
    claimed_at: datetime
    pending_since: datetime  # created_at, or when a retry or rescue last made it pending again

    @property
    def pickup_seconds(self) -> float:
        """Pending -> claimed on the server's clock: the wait of this claim, not of earlier attempts."""
        return (self.claimed_at - self.pending_since).total_seconds()


@dataclass(frozen=True)
class RunningJob:
    """A job as a stage sees it once its fence held."""

    job_id: UUID
    owner_user_id: UUID
    prompt: str
    # As text: jsonb holds what Python's json cannot load; `load_params` turns that into InvalidRequest.
    params_json: str
    attempt: int
    created_at: datetime
    claimed_at: datetime | None


@dataclass(frozen=True)
class Rescued:
    job_id: UUID
    status: str
    attempt: int


def execute_once(conn: Conn, query: str, params: Any = None) -> psycopg.Cursor[Any]:
    """Run one statement so that it is committed on return, or joins the caller's open transaction.

    On an autocommit connection with no transaction open (the listener's, the
    actors' pool) the statement commits by itself: BEGIN and COMMIT would be two
    round trips for nothing, on the claim path between a NOTIFY and a visible
    claim and on every stage write. Otherwise it runs in `conn.transaction()`,
    which commits at the end, or is a savepoint inside the caller's transaction.
    """
    if conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return conn.execute(query, params)
    with conn.transaction():
        return conn.execute(query, params)


def claim_jobs(conn: Conn, limit: int, *, max_owners: int = 1000) -> list[Claim]:
    """Claim up to `limit` pending jobs fairly across owners, committed on return."""
    rows = execute_once(conn, CLAIM, {"limit": limit, "max_owners": max_owners}).fetchall()
    # UPDATE ... RETURNING has no order: forward in claim order, every owner's first job first.
    rows.sort(key=lambda r: (r[5], r[3], r[0]))
    return [
        Claim(
            job_id=r[0],
            attempt=r[1],
            owner_user_id=r[2],
            created_at=r[3],
            claimed_at=r[4],
            pending_since=r[6],
        )
        for r in rows
    ]


def count_running(conn: Conn) -> int:
    row = conn.execute(COUNT_RUNNING).fetchone()
    return int(row[0]) if row else 0


def release_claim(conn: Conn, job_id: UUID, attempt: int) -> bool:
    """Put a claimed job back to pending after its forward failed (the attempt did not happen)."""
    return execute_once(conn, RELEASE, {"id": job_id, "attempt": attempt}).rowcount == 1


def rescue_expired(
    conn: Conn, *, lease_seconds: float, max_attempts: int, limit: int = 1000
) -> list[Rescued]:
    """Running jobs whose heartbeat is older than the lease: back to pending, or failed at max attempts."""
    params = {"lease": float(lease_seconds), "max_attempts": max_attempts, "limit": limit}
    rows = execute_once(conn, RESCUE, params).fetchall()
    return [Rescued(job_id=r[0], status=r[1], attempt=r[2]) for r in rows]


def begin_stage(conn: Conn, job_id: UUID | str, attempt: int, stage: str) -> RunningJob | None:
    """Fence, mark the stage and refresh the heartbeat; None when the job is no longer ours."""
    row = execute_once(conn, BEGIN_STAGE, {"id": job_id, "attempt": attempt, "stage": stage}).fetchone()
    if row is None:
        return None
    return RunningJob(
        job_id=row[0], owner_user_id=row[1], prompt=row[2], params_json=row[3], attempt=row[4],
        created_at=row[5], claimed_at=row[6],
    )  # fmt: skip


def load_params(params_json: str) -> Any:
    """A job's params from their jsonb text.

    PostgreSQL accepts jsonb that Python's json cannot load (nesting deeper than the
    recursion limit, integers over 4300 digits); that is the owner's input, not a
    transient failure, so it is an InvalidRequest.
    """
    import json

    from imagen.errors import InvalidRequest

    try:
        return json.loads(params_json)
    except (RecursionError, ValueError):
        raise InvalidRequest("params cannot be read: nested too deeply or a number too long") from None


def heartbeat_many(conn: Conn, keys: list[tuple[str, int]]) -> int:
    """Refresh the heartbeat of several (job_id, attempt) pairs in one statement; returns how many held."""
    ids = [k[0] for k in keys]
    attempts = [k[1] for k in keys]
    return execute_once(conn, HEARTBEAT_MANY, {"ids": ids, "attempts": attempts}).rowcount


def still_running(conn: Conn, keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which (job_id, attempt) pairs still hold their job (running at that attempt): a read, no lock."""
    params = {"ids": [k[0] for k in keys], "attempts": [k[1] for k in keys]}
    return {(str(r[0]), int(r[1])) for r in conn.execute(STILL_RUNNING, params).fetchall()}


def note_transient(conn: Conn, job_id: UUID | str, attempt: int, error: str) -> bool:
    """Remember the latest transient error, so a job that runs out of retries can say why."""
    return (
        execute_once(conn, NOTE_TRANSIENT, {"id": job_id, "attempt": attempt, "error": error[:2000]}).rowcount
        == 1
    )


def fail_job(conn: Conn, job_id: UUID | str, attempt: int, error: str) -> bool:
    return execute_once(conn, FAIL, {"id": job_id, "attempt": attempt, "error": error[:4000]}).rowcount == 1


def complete_job(conn: Conn, job_id: UUID | str, attempt: int, image_id: UUID | str) -> bool:
    """Mark done and link the image in one conditional UPDATE."""
    params = {"id": job_id, "attempt": attempt, "image_id": image_id}
    return execute_once(conn, COMPLETE, params).rowcount == 1


def job_state(conn: Conn, job_id: UUID | str) -> tuple[str, int] | None:
    row = conn.execute(STATE, {"id": job_id}).fetchone()
    return (row[0], row[1]) if row else None


def cancel_job(conn: Conn, job_id: UUID | str) -> bool:
    """Operator cancel: pending or running -> cancelled (a running one stops at its next stage)."""
    return execute_once(conn, CANCEL, {"id": job_id}).fetchone() is not None


def retry_job(conn: Conn, job_id: UUID | str) -> bool:
    """Operator retry: failed or cancelled -> pending; the attempt count carries on."""
    return execute_once(conn, RETRY, {"id": job_id}).fetchone() is not None


def get_job(conn: Conn, job_id: UUID | str) -> dict[str, Any] | None:
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM imagen.jobs WHERE id = %(id)s", {"id": job_id}).fetchone()


SUBMIT_AS_OWNER = """
INSERT INTO imagen.jobs (owner_user_id, prompt, params) VALUES (%(owner)s, %(prompt)s, %(params)s)
RETURNING id
"""


def submit_job(conn: Conn, owner_user_id: UUID, prompt: str, params: Any, *, as_owner: bool = True) -> UUID:
    """Insert a pending job and commit; `as_owner` does it the way the UI does (role
    `authenticated` with PostgREST's JWT claims, so RLS applies)."""
    import json

    from psycopg.types.json import Jsonb

    with conn.transaction():
        if as_owner:
            conn.execute("SET LOCAL ROLE authenticated")
            claims = json.dumps({"sub": str(owner_user_id), "role": "authenticated"})
            conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims,))
        row = conn.execute(
            SUBMIT_AS_OWNER, {"owner": owner_user_id, "prompt": prompt, "params": Jsonb(params)}
        ).fetchone()
    assert row is not None
    return UUID(str(row[0]))
