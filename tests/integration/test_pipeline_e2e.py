"""SQL INSERT -> done through a real listener and real Dramatiq workers on real PostgreSQL and Redis."""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from PIL import Image

from imagen import jobs
from imagen.broker import FINALIZE_QUEUE, GENERATE_QUEUE, SYNC_QUEUE
from imagen.smoke import TERMINAL
from tests.integration.conftest import listener_ready, workers_ready
from tests.integration.rows import job_row, query
from tests.waiting import wait_until


def submit(db_url: str, prompt: str, params: dict[str, Any], owner: uuid.UUID | None = None) -> uuid.UUID:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return jobs.submit_job(conn, owner or uuid.uuid4(), prompt, params)


def row(db_url: str, job_id: uuid.UUID) -> dict[str, Any]:
    found = job_row(db_url, job_id)
    assert found is not None
    return found


def wait_terminal(db_url: str, job_id: uuid.UUID, procs: Any, timeout: float = 30) -> dict[str, Any]:
    return wait_until(
        lambda: (r := row(db_url, job_id))["status"] in TERMINAL and r,
        timeout=timeout,
        message=f"job {job_id} terminal\n{procs.logs()}",
    )


def test_inserted_job_ends_done_with_image_row_object_and_owner(
    db_url: str, pipeline: Any, tmp_path: Path
) -> None:
    procs = pipeline()
    owner = uuid.uuid4()
    job_id = submit(db_url, "a lighthouse at dusk", {"backend": "mock", "size": "96x64", "seed": 3}, owner)
    done = wait_terminal(db_url, job_id, procs)
    assert done["status"] == "done", done["error"]
    assert done["attempt"] == 1 and done["error"] is None and done["finished_at"] is not None
    images = query(
        db_url,
        "SELECT id, owner_user_id, bucket, path, width, height, mime FROM imagen.images WHERE job_id = %s",
        job_id,
    )
    assert len(images) == 1
    image_id, image_owner, bucket, path, width, height, mime = images[0]
    assert done["image_id"] == image_id
    assert image_owner == owner
    assert path == f"{owner}/{job_id}.png" and (width, height, mime) == (96, 64, "image/png")
    stored = tmp_path / "storage" / bucket / path
    with Image.open(stored) as img:
        assert img.size == (96, 64)
    usage = query(db_url, "SELECT owner_user_id, backend, ok FROM imagen.usage WHERE job_id = %s", job_id)
    assert usage == [(owner, "mock", True)]
    # One worker consumes every queue, so sync and finalize ran chained in the generation message.
    stamps = done["stage_times"]
    assert set(stamps) == {"queued", "generating", "syncing", "done"}
    assert stamps["queued"] <= stamps["generating"] <= stamps["syncing"] <= stamps["done"]


def test_workers_split_by_queue_pass_the_image_through_the_hand_off(db_url: str, pipeline: Any) -> None:
    # Generation on one worker, sync and finalize on another, as on separate hosts.
    procs = pipeline(workers=0)
    for queues in ([GENERATE_QUEUE], [SYNC_QUEUE, FINALIZE_QUEUE]):
        w = procs.start_workers(1, 2, "--queues", *queues)
        wait_until(lambda w=w: workers_ready(w), timeout=30, message=f"workers ready\n{procs.logs()}")
    job_id = submit(db_url, "split across hosts", {"backend": "mock", "size": "32x32"})
    done = wait_terminal(db_url, job_id, procs)
    assert done["status"] == "done", done["error"]
    assert {"generating", "syncing", "finalizing", "done"} <= set(done["stage_times"])
    assert query(db_url, "SELECT count(*) FROM imagen.images WHERE job_id = %s", job_id) == [(1,)]


def test_chaining_turned_off_sends_every_stage_through_its_queue(db_url: str, pipeline: Any) -> None:
    procs = pipeline(IMAGEN_CHAIN_STAGES="false")
    job_id = submit(db_url, "three messages", {"backend": "mock", "size": "32x32"})
    done = wait_terminal(db_url, job_id, procs)
    assert done["status"] == "done", done["error"]
    assert {"generating", "syncing", "finalizing", "done"} <= set(done["stage_times"])


def test_permanent_failure_fails_at_once_with_readable_error(db_url: str, pipeline: Any) -> None:
    procs = pipeline()
    job_id = submit(db_url, "refuse me", {"backend": "mock", "fail": "permanent"})
    failed = wait_terminal(db_url, job_id, procs)
    assert failed["status"] == "failed"
    assert failed["error"].startswith("generation failed: mock backend: simulated permanent failure")
    assert query(db_url, "SELECT count(*) FROM imagen.usage WHERE job_id = %s AND NOT ok", job_id) == [(1,)]
    assert query(db_url, "SELECT count(*) FROM imagen.images WHERE job_id = %s", job_id) == [(0,)]


def test_transient_failures_exhaust_retries_then_fail_with_last_error(db_url: str, pipeline: Any) -> None:
    procs = pipeline(IMAGEN_STAGE_RETRIES="2")
    job_id = submit(db_url, "always busy", {"backend": "mock", "fail": "transient"})
    failed = wait_terminal(db_url, job_id, procs)
    assert failed["status"] == "failed"
    assert failed["error"] == (
        "generation gave up after 3 tries: generation: mock backend: simulated transient provider failure (503)"
    )
    # One provider call per try, each recorded as failed usage.
    assert query(db_url, "SELECT count(*) FROM imagen.usage WHERE job_id = %s AND NOT ok", job_id) == [(3,)]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"backend": "dalle"}, "unknown backend 'dalle'; jobs may use: mock"),
        ({"sise": "512x512"}, "unknown params key(s): sise"),
        ({"seed": "seven"}, "params.seed must be an integer, not str"),
        ({"size": "huge"}, "size must look like 1024x768, not 'huge'"),
        ({"preset": "nope"}, "unknown preset 'nope'; known presets:"),
    ],
)
def test_bad_params_fail_the_job_with_a_message_naming_the_problem(
    db_url: str, pipeline: Any, params: dict[str, Any], expected: str
) -> None:
    procs = pipeline()
    job_id = submit(db_url, "a cat", params)
    failed = wait_terminal(db_url, job_id, procs)
    assert failed["status"] == "failed"
    assert expected in failed["error"]
    assert failed["attempt"] == 1


def test_cancelled_pending_job_is_never_generated(db_url: str, pipeline: Any) -> None:
    owner = uuid.uuid4()
    job_id = submit(db_url, "never mind", {"backend": "mock"}, owner)
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert jobs.cancel_job(conn, job_id)
    procs = pipeline()
    probe = submit(db_url, "after the cancel", {"backend": "mock", "size": "32x32"})
    assert wait_terminal(db_url, probe, procs)["status"] == "done"
    cancelled = row(db_url, job_id)
    assert cancelled["status"] == "cancelled" and cancelled["attempt"] == 0 and cancelled["image_id"] is None


def test_cancelled_running_job_stops_at_next_stage_without_image(
    db_url: str, pipeline: Any, tmp_path: Path
) -> None:
    procs = pipeline()
    job_id = submit(db_url, "slow", {"backend": "mock", "delay_ms": 1500, "size": "32x32"})
    wait_until(lambda: row(db_url, job_id)["stage"] == "generating", timeout=15, message="generating")
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert jobs.cancel_job(conn, job_id)
    # The generation finishes, its hand-off is dropped at the fence: wait for that job's drop line
    # (the job id alone is in the claim's line already, and "dropped" anywhere proved nothing).
    wait_until(
        lambda: any(f"job {job_id} " in line and " dropped" in line for line in procs.logs().splitlines()),
        timeout=15,
        message=f"the drop of job {job_id} logged\n{procs.logs()}",
    )
    final = row(db_url, job_id)
    assert final["status"] == "cancelled" and final["image_id"] is None
    assert query(db_url, "SELECT count(*) FROM imagen.images WHERE job_id = %s", job_id) == [(0,)]
    assert not list((tmp_path / "storage").rglob(f"{job_id}.png"))


@pytest.mark.serial
def test_listener_picks_up_insert_within_a_second_after_its_backend_is_terminated(
    db_url: str, pipeline: Any
) -> None:
    procs = pipeline(IMAGEN_POLL_INTERVAL="30")
    killed = query(
        db_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'imagen-listener'"
        " AND datname = current_database()",
    )
    assert killed == [(True,)]
    wait_until(lambda: listener_ready(db_url), timeout=5, message=f"listener back\n{procs.logs()}")
    job_id = submit(db_url, "after the reconnect", {"backend": "mock", "size": "32x32"})
    done = wait_terminal(db_url, job_id, procs, timeout=10)
    pickup = (done["claimed_at"] - done["created_at"]).total_seconds()
    assert done["status"] == "done"
    assert pickup < 1.0, f"picked up after {pickup:.2f}s: the poll (30 s) did it, not NOTIFY"
    assert "reconnecting" in procs.logs()


def test_job_inserted_while_listener_was_down_is_claimed_by_catch_up(db_url: str, pipeline: Any) -> None:
    job_id = submit(db_url, "inserted before anyone listened", {"backend": "mock", "size": "32x32"})
    procs = pipeline(IMAGEN_POLL_INTERVAL="30")
    assert wait_terminal(db_url, job_id, procs, timeout=10)["status"] == "done"


def test_sigterm_listener_and_worker_mid_job_exit_zero_and_job_completes(db_url: str, pipeline: Any) -> None:
    procs = pipeline()
    job_id = submit(db_url, "finish me", {"backend": "mock", "delay_ms": 1500, "size": "32x32"})
    wait_until(lambda: row(db_url, job_id)["stage"] == "generating", timeout=15, message="generating")
    listener = next(p for p in procs.procs if p.name == "listener")
    workers = next(p for p in procs.procs if p.name == "workers")
    listener.send(signal.SIGTERM)
    assert listener.wait(15) == 0, listener.tail()
    # A worker asked to stop mid-job finishes the message in hand (the rest of the job may run on it
    # while it drains, or on a fresh worker): never a half-written job.
    workers.send(signal.SIGTERM)
    assert workers.wait(30) == 0, workers.tail()
    # The message in hand carries the whole job (its stages run chained on a worker of every queue).
    done = row(db_url, job_id)
    assert done["status"] == "done" and done["attempt"] == 1, "the job in hand finished before the exit"
    assert f"job {job_id} attempt=1 stage=finalizing done" in workers.tail(20_000)
    assert query(db_url, "SELECT count(*) FROM imagen.images WHERE job_id = %s", job_id) == [(1,)]


def test_one_owners_backlog_does_not_starve_another_owners_job(db_url: str, pipeline: Any) -> None:
    owner_a, owner_b = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, params) SELECT %s, 'a' || i,"
            ' \'{"backend": "mock", "size": "16x16", "delay_ms": 5}\' FROM generate_series(1, 500) i',
            (owner_a,),
        )
    procs = pipeline(IMAGEN_MAX_IN_FLIGHT="16")
    wait_until(
        lambda: query(db_url, "SELECT count(*) FROM imagen.jobs WHERE status = 'done'")[0][0] >= 20,
        timeout=30, message=f"A's backlog under way\n{procs.logs()}",
    )  # fmt: skip
    job_b = submit(db_url, "b's only job", {"backend": "mock", "size": "16x16"}, owner_b)
    done_b = wait_terminal(db_url, job_b, procs, timeout=60)
    assert done_b["status"] == "done"
    a_done_before_b = query(
        db_url,
        "SELECT count(*) FROM imagen.jobs WHERE owner_user_id = %s AND finished_at <= %s",
        owner_a,
        done_b["finished_at"],
    )[0][0]
    assert a_done_before_b < 250, f"B waited for {a_done_before_b} of A's 500 jobs"
