"""`imagen jobs ...` as an operator runs it: the real CLI in subprocesses against a real database.

Rows are seeded straight into imagen.jobs in every state with chosen timestamps,
so each command's output and effect can be checked exactly.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from imagen.smoke import TERMINAL
from tests.cli import clean_env, explain, run_imagen
from tests.integration.rows import job_row, query, scalar
from tests.waiting import wait_until

Run = Callable[..., subprocess.CompletedProcess[str]]
OWNER_A = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")
OWNER_B = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")


@pytest.fixture
def imagen_jobs(db_url: str, tmp_path: Path) -> Run:
    """Run `python -m imagen jobs ARGS` with only IMAGEN_DATABASE_URL set (cwd without a .env)."""

    def run(*args: str, input: str | None = None, database: bool = True) -> subprocess.CompletedProcess[str]:
        env = clean_env(IMAGEN_DATABASE_URL=db_url) if database else clean_env()
        return run_imagen("jobs", *args, env=env, cwd=tmp_path, timeout=60, input=input)

    return run


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, explain(result)
    return result.stdout


def db_now(db_url: str) -> datetime:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]


def _image(conn: psycopg.Connection[Any], job_id: uuid.UUID, path: str) -> uuid.UUID:
    """An images row of OWNER_A's job (the job must exist: images.job_id references it)."""
    row = conn.execute(
        "INSERT INTO imagen.images (owner_user_id, job_id, bucket, path, mime, width, height, bytes,"
        " prompt, backend) VALUES (%s, %s, 'imagen', %s, 'image/png', 64, 48, 1234, 'p', 'mock')"
        " RETURNING id",
        (OWNER_A, job_id, path),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def seed(db_url: str, **fields: Any) -> uuid.UUID:
    """Insert one job row as the database owner, with any columns given (timestamps included)."""
    values: dict[str, Any] = {"id": uuid.uuid4(), "owner_user_id": OWNER_A, "prompt": "a test prompt"}
    values.update(fields)
    for key in ("params", "stage_times"):
        if key in values:
            values[key] = Jsonb(values[key])
    columns = ", ".join(values)
    placeholders = ", ".join(f"%({k})s" for k in values)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO imagen.jobs ({columns}) VALUES ({placeholders})", values)
    return values["id"]


def test_ls_filters_by_status_owner_and_since_with_table_and_json(db_url: str, imagen_jobs: Run) -> None:
    now = db_now(db_url)
    pending = seed(db_url, status="pending", created_at=now - timedelta(minutes=1), prompt="newest pending")
    running = seed(
        db_url, status="running", stage="generating", attempt=1, created_at=now - timedelta(minutes=10)
    )
    done = seed(
        db_url, status="done", attempt=1, created_at=now - timedelta(minutes=30), owner_user_id=OWNER_B
    )
    failed = seed(db_url, status="failed", attempt=2, error="boom", created_at=now - timedelta(hours=3))
    cancelled = seed(db_url, status="cancelled", created_at=now - timedelta(days=2), owner_user_id=OWNER_B)

    table = ok(imagen_jobs("ls")).splitlines()
    assert table[0].split()[:4] == ["ID", "STATUS", "STAGE", "ATT"]
    assert [line.split()[0] for line in table[1:]] == [
        str(j) for j in (pending, running, done, failed, cancelled)
    ]
    running_line = table[2].split()
    assert running_line[1:4] == ["running", "generating", "1"]
    assert "newest pending" in table[1]

    def ids(*args: str) -> list[str]:
        return [row["id"] for row in json.loads(ok(imagen_jobs("ls", "--json", *args)))]

    assert ids("--status", "failed,cancelled") == [str(failed), str(cancelled)]
    assert ids("--status", "pending", "--status", "done") == [str(pending), str(done)]
    assert ids("--owner", str(OWNER_B)) == [str(done), str(cancelled)]
    assert ids("--since", "2h") == [str(pending), str(running), str(done)]
    assert ids("--since", "15m") == [str(pending), str(running)]
    iso = (now - timedelta(hours=4)).isoformat()
    assert ids("--since", iso) == [str(pending), str(running), str(done), str(failed)]
    assert ids("--limit", "2") == [str(pending), str(running)]
    assert ids("--status", "failed", "--owner", str(OWNER_B)) == []

    row = json.loads(ok(imagen_jobs("ls", "--json", "--status", "failed")))[0]
    assert row["status"] == "failed" and row["attempt"] == 2 and row["error"] == "boom"
    assert row["owner_user_id"] == str(OWNER_A)
    assert datetime.fromisoformat(row["created_at"]) == now - timedelta(hours=3)

    assert ok(imagen_jobs("ls", "--status", "done", "--owner", str(OWNER_A))).strip() == "no jobs match"
    bad = imagen_jobs("ls", "--status", "finished")
    assert bad.returncode == 2 and "'finished' is not one of" in bad.stderr, explain(bad)
    bad = imagen_jobs("ls", "--since", "yesterday")
    assert bad.returncode == 2 and "neither a duration" in bad.stderr, explain(bad)


def test_show_prints_stage_timings_error_and_usage_of_a_failed_job(db_url: str, imagen_jobs: Run) -> None:
    t0 = db_now(db_url) - timedelta(minutes=5)
    stage_times = {
        "queued": (t0 + timedelta(milliseconds=500)).isoformat(),
        "generating": (t0 + timedelta(milliseconds=750)).isoformat(),
    }
    job_id = seed(
        db_url,
        status="failed",
        attempt=3,
        params={"backend": "mock", "fail": "transient"},
        error="generation gave up after 3 tries: mock backend: simulated transient failure",
        last_error="generation: mock backend: simulated transient failure",
        stage_times=stage_times,
        created_at=t0,
        claimed_at=t0 + timedelta(milliseconds=500),
        heartbeat_at=t0 + timedelta(seconds=1),
        finished_at=t0 + timedelta(seconds=2),
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO imagen.usage (owner_user_id, job_id, backend, model, images, latency_ms, ok, error)"
            " VALUES (%s, %s, 'mock', 'mock-1', 0, 12, false, 'simulated transient failure')",
            (OWNER_A, job_id),
        )
        conn.execute(
            "INSERT INTO imagen.usage (owner_user_id, job_id, backend, model, images, ok, cost_basis)"
            " VALUES (%s, %s, 'openai', 'gpt-image-9', 1, true, 'unpriced: no price for model')",
            (OWNER_A, job_id),
        )

    text = ok(imagen_jobs("show", str(job_id)))
    lines = text.splitlines()
    assert f"job         {job_id}" in lines
    assert "status      failed (attempt 3)" in lines
    assert "error       generation gave up after 3 tries: mock backend: simulated transient failure" in lines
    assert "last_error  generation: mock backend: simulated transient failure" in lines
    assert 'params      {"backend": "mock", "fail": "transient"}' in lines
    events = [line.split() for line in lines if line.startswith("  ") and line.split()[0] in TIMELINE]
    assert events[0][0] == "created"
    assert [(e[0], e[3], e[4]) for e in events[1:]] == [
        ("queued", "+500.0", "ms"),
        ("generating", "+250.0", "ms"),
        ("failed", "+1.25", "s"),
    ]
    assert events[-1][-2:] == ["2.00", "s"]  # failed 2 s after created
    assert "image       -" in lines
    usage = [line for line in lines if "mock/mock-1" in line]
    assert len(usage) == 1 and "failed: simulated transient failure" in usage[0]
    (unpriced,) = [line for line in lines if "openai/gpt-image-9" in line]
    assert "cost unpriced" in unpriced

    data = json.loads(ok(imagen_jobs("show", str(job_id), "--json")))
    assert data["job"]["id"] == str(job_id) and data["job"]["status"] == "failed"
    assert [(e["event"], e["since_previous"]) for e in data["timeline"]] == [
        ("created", None),
        ("queued", 0.5),
        ("generating", 0.25),
        ("failed", 1.25),
    ]
    assert data["image"] is None
    assert [(u["backend"], u["ok"]) for u in data["usage"]] == [("mock", False), ("openai", True)]
    assert data["usage"][1]["cost_basis"].startswith("unpriced:")

    missing = imagen_jobs("show", str(uuid.uuid4()))
    assert missing.returncode == 1 and missing.stderr.startswith("imagen: no job "), explain(missing)
    assert len(missing.stderr.strip().splitlines()) == 1


TIMELINE = ("created", "queued", "generating", "syncing", "finalizing", "done", "failed", "cancelled")


def test_show_prints_the_image_row_of_a_done_job(db_url: str, imagen_jobs: Run) -> None:
    t0 = db_now(db_url) - timedelta(minutes=1)
    stamps = {name: (t0 + timedelta(milliseconds=ms)).isoformat() for name, ms in STAGE_MS.items()}
    job_id = seed(
        db_url,
        status="done",
        attempt=1,
        stage_times=stamps,
        created_at=t0,
        claimed_at=t0 + timedelta(milliseconds=10),
        finished_at=t0 + timedelta(milliseconds=400),
    )
    path = f"{OWNER_A}/{job_id}.png"
    with psycopg.connect(db_url, autocommit=True) as conn:
        image_id = _image(conn, job_id, path)
        conn.execute("UPDATE imagen.jobs SET image_id = %s WHERE id = %s", (image_id, job_id))
    lines = ok(imagen_jobs("show", str(job_id))).splitlines()
    assert f"image       {image_id} imagen/{path} (image/png, 64x48, 1234 bytes)" in lines
    events = [line.split()[0] for line in lines if line.startswith("  ") and line.split()[0] in TIMELINE]
    assert events == ["created", "queued", "generating", "syncing", "finalizing", "done"]
    data = json.loads(ok(imagen_jobs("show", "--json", str(job_id))))
    assert data["image"]["path"] == path and data["image"]["bytes"] == 1234
    steps = {e["event"]: e["since_previous"] for e in data["timeline"]}
    assert steps == {
        "created": None,
        "queued": 0.01,
        "generating": 0.005,
        "syncing": 0.285,
        "finalizing": 0.05,
        "done": 0.05,
    }


STAGE_MS = {"queued": 10, "generating": 15, "syncing": 300, "finalizing": 350, "done": 400}


def test_retry_moves_failed_and_cancelled_to_pending_and_refuses_other_states(
    db_url: str, imagen_jobs: Run
) -> None:
    now = db_now(db_url)
    failed = seed(
        db_url,
        status="failed",
        attempt=2,
        error="boom",
        last_error="flaky",
        stage_times={"queued": now.isoformat()},
        claimed_at=now,
        finished_at=now,
    )
    cancelled = seed(db_url, status="cancelled", finished_at=now)
    done = seed(db_url, status="done", attempt=1, finished_at=now)
    running = seed(db_url, status="running", stage="generating", attempt=1, claimed_at=now, heartbeat_at=now)

    assert ok(imagen_jobs("retry", str(failed))).strip() == f"job {failed}: failed -> pending"
    row = job_row(db_url, failed)
    assert row is not None
    assert (row["status"], row["attempt"], row["error"], row["last_error"]) == ("pending", 2, None, None)
    assert row["finished_at"] is None and row["claimed_at"] is None and row["stage_times"] == {}

    assert ok(imagen_jobs("retry", str(cancelled))).strip() == f"job {cancelled}: cancelled -> pending"
    assert job_row(db_url, cancelled)["status"] == "pending"  # type: ignore[index]

    for job_id, status in ((done, "done"), (running, "running")):
        refused = imagen_jobs("retry", str(job_id))
        assert refused.returncode == 1, explain(refused)
        assert refused.stderr.strip() == (
            f"imagen: job {job_id} is {status}: only failed or cancelled jobs can be retried"
        )
        assert job_row(db_url, job_id)["status"] == status  # type: ignore[index]

    missing = imagen_jobs("retry", str(uuid.uuid4()))
    assert missing.returncode == 1 and "no job" in missing.stderr, explain(missing)
    bad = imagen_jobs("retry", "not-a-uuid")
    assert bad.returncode == 2, explain(bad)


def test_cancel_stops_pending_and_running_jobs_and_refuses_finished_ones(
    db_url: str, imagen_jobs: Run
) -> None:
    now = db_now(db_url)
    pending = seed(db_url, status="pending")
    running = seed(db_url, status="running", stage="syncing", attempt=1, claimed_at=now, heartbeat_at=now)
    failed = seed(db_url, status="failed", error="boom", finished_at=now)

    assert ok(imagen_jobs("cancel", str(pending))).strip() == f"job {pending}: pending -> cancelled"
    out = ok(imagen_jobs("cancel", str(running))).strip()
    assert out == f"job {running}: running -> cancelled (it stops at its next stage boundary)"
    for job_id in (pending, running):
        row = job_row(db_url, job_id)
        assert row is not None
        assert row["status"] == "cancelled" and row["stage"] is None and row["finished_at"] is not None

    refused = imagen_jobs("cancel", str(failed))
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"imagen: job {failed} is failed: only pending or running jobs can be cancelled"
    )
    again = imagen_jobs("cancel", str(pending))
    assert again.returncode == 1 and "is cancelled" in again.stderr, explain(again)
    assert job_row(db_url, failed)["status"] == "failed"  # type: ignore[index]


def test_stats_reports_counts_depth_oldest_pending_and_percentiles(db_url: str, imagen_jobs: Run) -> None:
    now = db_now(db_url)
    pickups = [0.1, 0.2, 0.3, 0.4, 1.0, 2.5]
    totals = [0.5, 0.9, 1.1, 1.3, 2.0, 6.0]
    for pickup, total in zip(pickups, totals, strict=True):
        created = now - timedelta(minutes=20)
        seed(
            db_url,
            status="done",
            attempt=1,
            created_at=created,
            claimed_at=created + timedelta(seconds=pickup),
            finished_at=created + timedelta(seconds=total),
        )
    # Outside the 1h window: must not move the percentiles.
    old = now - timedelta(hours=3)
    seed(
        db_url,
        status="done",
        attempt=1,
        created_at=old,
        claimed_at=old + timedelta(seconds=500),
        finished_at=old + timedelta(seconds=900),
    )
    seed(
        db_url, status="failed", attempt=3, error="x", created_at=now - timedelta(minutes=5), finished_at=now
    )
    seed(
        db_url, status="cancelled", created_at=now - timedelta(days=1), finished_at=now - timedelta(hours=23)
    )
    seed(db_url, status="pending", created_at=now - timedelta(minutes=5))
    seed(db_url, status="pending", created_at=now - timedelta(seconds=30))
    for stage in ("generating", "generating", "syncing"):
        seed(db_url, status="running", stage=stage, attempt=1, claimed_at=now, heartbeat_at=now)

    data = json.loads(ok(imagen_jobs("stats", "--json")))
    assert data["counts"] == {"pending": 2, "running": 3, "done": 7, "failed": 1, "cancelled": 1}
    assert data["queue_depth"] == 2
    assert data["running_by_stage"] == {"generating": 2, "syncing": 1}
    assert 300 <= data["oldest_pending_seconds"] < 400
    assert data["window_seconds"] == 3600
    assert data["finished_in_window"] == {"done": 6, "failed": 1, "cancelled": 0}
    p95 = statistics.quantiles(pickups, n=20, method="inclusive")[18]
    assert data["pickup_p50"] == pytest.approx(statistics.median(pickups))  # 0.35
    assert data["pickup_p95"] == pytest.approx(p95)
    assert data["total_p50"] == pytest.approx(statistics.median(totals))  # 1.2
    assert data["total_p95"] == pytest.approx(statistics.quantiles(totals, n=20, method="inclusive")[18])

    wide = json.loads(ok(imagen_jobs("stats", "--window", "1d", "--json")))
    assert wide["finished_in_window"] == {"done": 7, "failed": 1, "cancelled": 1}
    assert wide["pickup_p50"] == pytest.approx(0.4)

    text = ok(imagen_jobs("stats")).splitlines()
    assert text[0].startswith("pending     2  (queue depth; oldest 5m")
    assert text[1] == "running     3  (generating 2, syncing 1)"
    assert "pickup      p50 350.0 ms  p95 " in text[-4]
    assert text[-3].startswith("total       p50 1.20 s  p95 ")
    assert text[-2] == "cost        $0.0000 est. over 0 provider call(s) in the window"
    assert text[-1] == "usage today (since 00:00 UTC): none"

    bad = imagen_jobs("stats", "--window", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr, explain(bad)


def test_stats_on_an_empty_table_prints_no_latencies(db_url: str, imagen_jobs: Run) -> None:
    data = json.loads(ok(imagen_jobs("stats", "--json")))
    assert data["counts"] == dict.fromkeys(("pending", "running", "done", "failed", "cancelled"), 0)
    assert data["oldest_pending_seconds"] is None and data["pickup_p50"] is None
    assert "pickup      p50 -  p95 -" in ok(imagen_jobs("stats"))


def test_stats_counts_provider_spend_and_names_calls_the_price_table_cannot_cost(
    db_url: str, imagen_jobs: Run
) -> None:
    rows = [
        ("gemini", "gemini-2.5-flash-image", 0.0387, "imagen/data/prices.toml gemini-2.5-flash-image ..."),
        ("openai", "gpt-image-2.5-flare", 0.0060, "imagen/data/prices.toml gpt-image-2.5-flare ..."),
        ("openai", "gpt-image-9", None, "unpriced: no price for model 'gpt-image-9'"),
    ]
    with psycopg.connect(db_url, autocommit=True) as conn:
        for backend, model, cost, basis in rows:
            conn.execute(
                "INSERT INTO imagen.usage (backend, model, images, ok, cost_usd, cost_basis)"
                " VALUES (%s, %s, 1, true, %s, %s)",
                (backend, model, cost, basis),
            )

    data = json.loads(ok(imagen_jobs("stats", "--json")))
    text = ok(imagen_jobs("stats"))

    assert data["provider_calls"] == 3
    assert data["cost_usd"] == pytest.approx(0.0447)
    assert (data["unpriced_calls"], data["unpriced_models"]) == (1, ["openai/gpt-image-9"])
    assert "$0.0447 est. over 3 provider call(s)" in text
    assert "1 call(s) UNPRICED" in text
    assert "openai/gpt-image-9" in text


def test_prune_deletes_only_old_terminal_jobs_and_dry_run_deletes_nothing(
    db_url: str, imagen_jobs: Run
) -> None:
    now = db_now(db_url)
    long_ago = now - timedelta(days=40)
    old_done = seed(db_url, status="done", created_at=long_ago, finished_at=long_ago)
    old_failed = seed(db_url, status="failed", created_at=long_ago, finished_at=long_ago)
    old_cancelled = seed(db_url, status="cancelled", created_at=long_ago, finished_at=long_ago)
    # Created long ago but finished recently: its age counts from finished_at.
    late_done = seed(db_url, status="done", created_at=long_ago, finished_at=now - timedelta(days=1))
    old_pending = seed(db_url, status="pending", created_at=long_ago)
    old_running = seed(
        db_url, status="running", stage="generating", attempt=1, created_at=long_ago, heartbeat_at=now
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO imagen.usage (owner_user_id, job_id, backend, model, ok) VALUES (%s, %s, 'mock', 'm', true)",
            (OWNER_A, old_done),
        )
        kept_image = _image(conn, old_done, f"{OWNER_A}/{old_done}.png")

    def remaining() -> set[uuid.UUID]:
        with psycopg.connect(db_url, autocommit=True) as conn:
            return {r[0] for r in conn.execute("SELECT id FROM imagen.jobs").fetchall()}

    everything = remaining()
    dry = ok(imagen_jobs("prune", "--older-than", "30d", "--dry-run")).strip()
    assert dry == "would delete 3 done/failed/cancelled job(s) older than 30d", dry
    # The age reads as the operator wrote it, never as a timing ("0.0 ms", "45.00 s").
    for given, shown in (("0s", "0s"), ("45s", "45s"), ("36h", "36h"), ("1.5h", "90m")):
        dry = ok(imagen_jobs("prune", "--older-than", given, "--status", "done", "--dry-run")).strip()
        assert dry.endswith(f"done job(s) older than {shown}"), dry
    assert remaining() == everything

    declined = imagen_jobs("prune", "--older-than", "30d", input="n\n")
    assert declined.returncode == 1 and "delete 3 " in declined.stdout, explain(declined)
    assert remaining() == everything

    out = ok(imagen_jobs("prune", "--older-than", "30d", "--status", "done", "--yes")).strip()
    assert out.startswith("deleted 1 done job(s)"), out
    assert out.endswith("; kept 1 image row(s), detached from their jobs"), out
    assert remaining() == everything - {old_done}
    assert scalar(db_url, "SELECT count(*) FROM imagen.usage WHERE job_id IS NULL") == 1
    # The image stays its owner's, linked to no job: a later job with that id cannot pick it up.
    image = query(db_url, "SELECT owner_user_id, job_id FROM imagen.images WHERE id = %s", kept_image)
    assert image == [(OWNER_A, None)]

    confirmed = imagen_jobs("prune", "--older-than", "30d", input="y\n")
    assert confirmed.returncode == 0 and "deleted 2 " in confirmed.stdout, explain(confirmed)
    assert remaining() == {late_done, old_pending, old_running}
    assert not remaining() & {old_failed, old_cancelled}

    assert ok(imagen_jobs("prune", "--older-than", "30d", "--yes")).startswith("deleted 0 ")
    refused = imagen_jobs("prune", "--older-than", "1s", "--status", "done,pending", "--yes")
    assert refused.returncode == 2 and "'pending' is not one of done, failed, cancelled" in refused.stderr
    assert remaining() == {late_done, old_pending, old_running}
    missing = imagen_jobs("prune", "--yes")
    assert missing.returncode == 2 and "--older-than" in missing.stderr, explain(missing)


def test_watch_once_prints_counts_and_the_latest_jobs(db_url: str, imagen_jobs: Run) -> None:
    now = db_now(db_url)
    ids = [seed(db_url, status="pending", created_at=now - timedelta(seconds=i)) for i in range(5)]
    seed(db_url, status="running", stage="syncing", attempt=1, created_at=now - timedelta(hours=1))
    seed(db_url, status="failed", error="x", created_at=now - timedelta(hours=2), finished_at=now)

    lines = ok(imagen_jobs("watch", "--once", "--limit", "3")).splitlines()
    assert lines[0].startswith("imagen jobs ")
    assert lines[1] == "pending 5  running 1  done 0  failed 1  cancelled 0"
    assert lines[2] == "running by stage: syncing 1"
    table = lines[lines.index("") + 1 :]
    assert table[0].startswith("ID ")
    assert [line.split()[0] for line in table[1:]] == [str(i) for i in ids[:3]]


def watch_once_in_process(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap: int
) -> list[str]:
    """One `imagen jobs watch --once` frame, run in this process so the count cap can be made small."""
    from click.testing import CliRunner

    from imagen import jobs_admin
    from imagen.cli import main

    monkeypatch.setattr(jobs_admin, "COUNT_CAP", cap)
    monkeypatch.chdir(tmp_path)  # no .env
    keep = clean_env(IMAGEN_DATABASE_URL=db_url)
    env: dict[str, str | None] = {name: None for name in os.environ if name not in keep}
    env.update(keep)
    result = CliRunner().invoke(main, ["jobs", "watch", "--once"], env=env)
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def test_watch_shows_a_status_at_the_count_cap_as_cap_plus(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(4):
        seed(db_url, status="done", finished_at=db_now(db_url))
    seed(db_url, status="pending")

    lines = watch_once_in_process(db_url, tmp_path, monkeypatch, cap=3)
    assert lines[1] == "pending 1  running 0  done 3+  failed 0  cancelled 0"


def test_watch_gives_running_jobs_by_stage_exactly_when_running_is_at_the_cap(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for stage in ("generating", "generating", "generating", "syncing"):
        seed(db_url, status="running", stage=stage, attempt=1)

    lines = watch_once_in_process(db_url, tmp_path, monkeypatch, cap=3)
    assert lines[1] == "pending 0  running 3+  done 0  failed 0  cancelled 0"
    assert lines[2] == "running by stage: generating 3  syncing 1"


def test_commands_need_a_database_url_and_fail_in_one_line(imagen_jobs: Run) -> None:
    for args in (("ls",), ("stats",), ("watch", "--once"), ("show", str(uuid.uuid4()))):
        result = imagen_jobs(*args, database=False)
        assert result.returncode == 78, explain(result)
        assert result.stderr.startswith("imagen: IMAGEN_DATABASE_URL is not set"), explain(result)
        assert len(result.stderr.strip().splitlines()) == 1


def test_submit_refuses_missing_owner_bad_params_and_a_blank_prompt(db_url: str, imagen_jobs: Run) -> None:
    no_owner = imagen_jobs("submit", "a prompt")
    assert no_owner.returncode == 2 and "no owner" in no_owner.stderr, explain(no_owner)
    for params in ("{not json", "[1, 2]"):
        bad = imagen_jobs("submit", "a prompt", "--owner", str(OWNER_A), "--params", params)
        assert bad.returncode == 2 and "--params" in bad.stderr, explain(bad)
    blank = imagen_jobs("submit", " \t ", "--owner", str(OWNER_A))
    assert blank.returncode == 2, explain(blank)
    assert "the prompt must not be blank" in blank.stderr and "jobs_prompt_check" not in blank.stderr
    assert scalar(db_url, "SELECT count(*) FROM imagen.jobs") == 0


# Timed out (exit within 10 s of SIGINT) once in the parallel pool on Python 3.13 under heavy load;
# passes alone. Run alone until that is understood.
@pytest.mark.serial
def test_watch_refreshes_until_interrupted_and_exits_cleanly(db_url: str, tmp_path: Path) -> None:
    seed(db_url, status="pending")
    out = tmp_path / "watch.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEN_")}
    env.update(IMAGEN_DATABASE_URL=db_url, PYTHONUNBUFFERED="1")
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagen", "jobs", "watch", "--interval", "0.2"],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: out.read_text().count("imagen jobs ") >= 2, timeout=30, message="two frames")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert "Ctrl-C to stop" in text and "pending 1  running 0" in text
    assert "Traceback" not in text


def test_submitted_job_runs_through_the_pipeline_and_show_lists_its_image(
    db_url: str, imagen_jobs: Run, pipeline: Any
) -> None:
    procs = pipeline()
    params = json.dumps({"backend": "mock", "size": "64x64", "seed": 7})
    out = ok(imagen_jobs("submit", "a lighthouse at dusk", "--owner", str(OWNER_B), "--params", params))
    job_id = uuid.UUID(out.strip())
    row = wait_until(
        lambda: (r := job_row(db_url, job_id)) is not None and r["status"] in TERMINAL and r,
        timeout=30,
        message=f"job {job_id} terminal\n{procs.logs()}",
    )
    assert row["status"] == "done", row["error"]
    assert row["owner_user_id"] == OWNER_B

    lines = ok(imagen_jobs("show", str(job_id))).splitlines()
    assert "status      done (attempt 1)" in lines
    image = [line for line in lines if line.startswith("image ")]
    assert image == [
        f"image       {row['image_id']} imagen/{OWNER_B}/{job_id}.png (image/png, 64x64, "
        f"{scalar(db_url, 'SELECT bytes FROM imagen.images WHERE job_id = %s', job_id)} bytes)"
    ]
    events = [line.split()[0] for line in lines if line.startswith("  ") and line.split()[0] in TIMELINE]
    assert events == ["created", "queued", "generating", "syncing", "done"]  # stages chained in one worker
    assert any("mock/" in line and line.rstrip().endswith("ok") for line in lines)

    listed = json.loads(ok(imagen_jobs("ls", "--json", "--owner", str(OWNER_B))))
    assert [(r["id"], r["status"], r["image_id"]) for r in listed] == [
        (str(job_id), "done", str(row["image_id"]))
    ]
