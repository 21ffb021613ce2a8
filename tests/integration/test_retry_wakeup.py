"""A job that becomes pending again (operator retry, lease rescue) is claimed at once, and its pickup
counts from then: the listener here polls only once a minute, so its poll cannot explain a fast claim."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from imagen import jobs
from imagen.devtools.runner import listeners_listening
from tests.cli import clean_env, explain, run_imagen
from tests.integration.rows import scalar
from tests.integration.test_pipeline_e2e import row, submit, wait_terminal
from tests.waiting import wait_until

# Pickups under 1 s: run alone, outside the parallel pool (pyproject: serial).
pytestmark = pytest.mark.serial

SLOW_POLL = "60"
WELL_UNDER_THE_POLL = 2.5  # seconds; the default poll is 5 s and this listener's is 60 s


def claimed_again(db_url: str, job_id: uuid.UUID, attempt: int, procs: Any) -> dict[str, Any]:
    return wait_until(
        lambda: (r := row(db_url, job_id))["attempt"] >= attempt and r["claimed_at"] is not None and r,
        timeout=WELL_UNDER_THE_POLL,
        message=f"job {job_id} claimed again (attempt {attempt})\n{procs.logs()}",
    )


def test_a_retried_job_is_claimed_at_once_and_its_pickup_counts_from_the_retry(
    db_url: str, pipeline: Any, tmp_path: Path
) -> None:
    procs = pipeline(IMAGEN_POLL_INTERVAL=SLOW_POLL)
    job_id = submit(db_url, "a typo in its params", {"backend": "mock", "sise": "64x64"})
    failed = wait_terminal(db_url, job_id, procs)
    assert failed["status"] == "failed" and failed["attempt"] == 1
    with psycopg.connect(
        db_url, autocommit=True
    ) as conn:  # an old job: a pickup from created_at would show it
        conn.execute(
            "UPDATE imagen.jobs SET created_at = created_at - interval '1 hour' WHERE id = %s", (job_id,)
        )

    retried = run_imagen(
        "jobs", "retry", str(job_id), env=clean_env(IMAGEN_DATABASE_URL=db_url), cwd=tmp_path
    )
    assert retried.returncode == 0, explain(retried)
    again = claimed_again(db_url, job_id, 2, procs)

    assert again["pending_at"] is not None and again["pending_at"] > failed["finished_at"]
    pickup = (again["claimed_at"] - again["pending_at"]).total_seconds()
    assert 0 <= pickup < 1.0, pickup
    assert (again["claimed_at"] - again["created_at"]).total_seconds() >= 3600
    # The listener's pickup metric (its log line) counts from the retry too.
    claims = [line for line in procs.logs().splitlines() if str(job_id) in line and " claimed " in line]
    assert claims and float(claims[-1].rsplit("pickup_ms=", 1)[1].split()[0]) < 1000, claims
    # `jobs show` starts the last attempt's timeline where the retry made it pending.
    shown = run_imagen(
        "jobs", "show", str(job_id), "--json", env=clean_env(IMAGEN_DATABASE_URL=db_url), cwd=tmp_path
    )
    timeline = [event["event"] for event in json.loads(shown.stdout)["timeline"]]
    assert timeline[:3] == ["created", "pending", "queued"], timeline


def test_a_job_another_listener_rescued_is_claimed_at_once(db_url: str, pipeline: Any) -> None:
    procs = pipeline(IMAGEN_POLL_INTERVAL=SLOW_POLL)
    job_id = uuid.uuid4()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO imagen.jobs (id, owner_user_id, prompt, params, status, stage, attempt,"
            " claimed_at, heartbeat_at) VALUES (%s, %s, 'an expired lease', %s, 'running', 'generating', 1,"
            " now() - interval '2 minutes', now() - interval '2 minutes')",
            (job_id, uuid.uuid4(), json.dumps({"backend": "mock", "size": "32x32"})),
        )
        # Another listener's rescuer, with a 60 s lease. This listener's own lease is 600 s, so its
        # rescue (at start and on its minute-long poll) leaves the job alone.
        rescued = jobs.rescue_expired(conn, lease_seconds=60, max_attempts=3)
    assert [r.status for r in rescued] == ["pending"]

    again = claimed_again(db_url, job_id, 2, procs)
    assert (again["claimed_at"] - again["pending_at"]).total_seconds() < 1.0
    assert wait_terminal(db_url, job_id, procs)["status"] == "done"


def test_a_release_after_a_failed_forward_keeps_pending_at_and_sends_no_wakeup(db_url: str) -> None:
    """A failed forward (Redis down) must not wake the listener straight back into the same outage."""
    job_id = submit(db_url, "a forward that failed", {"backend": "mock"})
    with psycopg.connect(db_url, autocommit=True) as listen, psycopg.connect(db_url, autocommit=True) as conn:
        listen.execute("LISTEN imagen_jobs")
        (claim,) = jobs.claim_jobs(conn, 10)
        for _ in listen.notifies(timeout=0):
            pass
        assert jobs.release_claim(conn, claim.job_id, claim.attempt)
        assert list(listen.notifies(timeout=0.2)) == []
    assert scalar(db_url, "SELECT pending_at FROM imagen.jobs WHERE id = %s", job_id) is None


def test_stats_pickup_counts_from_when_a_retried_job_became_pending(db_url: str, tmp_path: Path) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, status, attempt, created_at, pending_at,"
            " claimed_at, finished_at) VALUES (%s, 'retried an hour later', 'done', 2, now() - interval '1 hour',"
            " now() - interval '2 seconds', now() - interval '1990 milliseconds', now())",
            (uuid.uuid4(),),
        )
    result = run_imagen("jobs", "stats", "--json", env=clean_env(IMAGEN_DATABASE_URL=db_url), cwd=tmp_path)
    assert result.returncode == 0, explain(result)
    stats = json.loads(result.stdout)
    assert abs(stats["pickup_p50"] - 0.01) < 0.001, stats
    # --json rounds times to 0.01 ms (seconds to 5 decimals): no float noise.
    assert all(len(repr(stats[k]).partition(".")[2]) <= 5 for k in ("pickup_p50", "total_p50")), stats
    assert stats["total_p50"] > 3599, stats


def test_readiness_finds_a_listener_whatever_its_application_name(db_url: str) -> None:
    """Supavisor's session mode replaces application_name; the LISTEN connection is found by its statements."""
    from imagen.listener import HEALTH_SQL, LISTEN_SQL

    with psycopg.connect(db_url, autocommit=True, application_name="Supavisor") as session:
        assert listeners_listening(db_url) == 0
        session.execute(LISTEN_SQL)
        assert listeners_listening(db_url) == 1
        session.execute(HEALTH_SQL)  # the listener's self-check, every 10 s
        assert listeners_listening(db_url) == 1
        session.execute("SELECT 1")
        assert listeners_listening(db_url) == 0
