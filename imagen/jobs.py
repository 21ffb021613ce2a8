"""The job row: claim, stage, heartbeat, complete, fail, rescue, cancel, retry.

The functions on the job row over one connection; their statements are in
imagen/store/jobs.sql, loaded by name (the claim is one template there, filled
here in two forms), and their typed rows in `imagen.store.rows`. Every write a
stage makes is fenced on `status = 'running' AND attempt = <the message's
attempt>`: a function returns False (or None) when the fence fails, and the
caller drops the message. Every write is one
statement run by `execute_once`, so it is committed when the function returns,
unless the caller holds a transaction open, which it then joins.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from imagen.store.queries import QUERIES
from imagen.store.rows import Claim, Rescued, RunningJob

Conn = psycopg.Connection[Any]

# The claim's template is in imagen/store/jobs.sql (claim_jobs_template), with why it is so.
_CLAIM = QUERIES["claim_jobs_template"]
CLAIM = _CLAIM.format(running="NULL::bigint", limit="%(limit)s")
# The idle path's claim: the in-flight count in the same statement, not a round trip before it
# (the count is of the statement's snapshot, before this claim's rows; the gate gets it back).
CLAIM_WITHIN_CAP = _CLAIM.format(
    running=f"({QUERIES['count_running'].strip()})",
    limit="least(%(limit)s, greatest(%(cap)s - (SELECT n FROM running), 0))",
)

# The statements are in imagen/store/jobs.sql, with why each is written as it is.
COUNT_RUNNING = QUERIES["count_running"]
RELEASE = QUERIES["release_claim"]
RESCUE = QUERIES["rescue_expired"]
BEGIN_STAGE = QUERIES["begin_stage"]
HEARTBEAT_MANY = QUERIES["heartbeat_many"]
STILL_RUNNING = QUERIES["still_running"]
NOTE_TRANSIENT = QUERIES["note_transient"]
FAIL = QUERIES["fail_job"]
COMPLETE = QUERIES["complete_job"]
STATE = QUERIES["job_state"]
CANCEL = QUERIES["cancel_job"]
RETRY = QUERIES["retry_job"]
GET = QUERIES["get_job"]
SUBMIT = QUERIES["submit_job"]


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
    return _claims(rows)


def claim_within_cap(conn: Conn, limit: int, max_in_flight: int) -> tuple[list[Claim], int | None]:
    """Claim up to min(limit, max_in_flight - running) in one round trip; with the running count
    before the claim, or None when nothing was claimed (then count if it matters)."""
    params = {"limit": limit, "cap": max_in_flight, "max_owners": 1000}
    rows = execute_once(conn, CLAIM_WITHIN_CAP, params).fetchall()
    return _claims(rows), (int(rows[0][7]) if rows else None)


def _claims(rows: list[Any]) -> list[Claim]:
    # UPDATE ... RETURNING has no order: forward in claim order, every owner's next job first.
    rows.sort(key=lambda r: r[5])
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
        return cur.execute(GET, {"id": job_id}).fetchone()


def submit_job(conn: Conn, owner_user_id: UUID, prompt: str, params: Any, *, as_owner: bool = True) -> UUID:
    """Insert a pending job and commit; `as_owner` does it the way the UI does (role
    `authenticated` with PostgREST's JWT claims, so RLS applies)."""
    import json

    from psycopg.types.json import Jsonb

    with conn.transaction():
        if as_owner:
            conn.execute(QUERIES["become_owner_role"])
            claims = json.dumps({"sub": str(owner_user_id), "role": "authenticated"})
            conn.execute(QUERIES["act_as_owner"], {"claims": claims})
        row = conn.execute(
            SUBMIT, {"owner": owner_user_id, "prompt": prompt, "params": Jsonb(params)}
        ).fetchone()
    assert row is not None
    return UUID(str(row[0]))
