"""The README's commands through the real CLI: `imagen smoke` against running processes, `imagen demo` from nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from imagen.devtools.servers import free_port
from tests.cli import clean_env, explain, run_imagen
from tests.integration.rows import query


def test_smoke_prints_pickup_total_and_where_the_image_went_and_exits_zero_when_done(
    db_url: str, pipeline: Any, tmp_path: Path
) -> None:
    pipeline()  # local storage under tmp_path/storage, as the smoke is told below
    env = clean_env(IMAGEN_DATABASE_URL=db_url, IMAGEN_STORAGE_DIR=str(tmp_path / "storage"))
    result = run_imagen("smoke", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert lines["status"].split()[1] == "done"
    pickup_ms = float(lines["pickup"].split()[1])
    total_ms = float(lines["total"].split()[1])
    assert 0 <= pickup_ms <= total_ms < 10_000
    job_id = lines["job"].split()[1]
    (bucket, path) = query(db_url, "SELECT bucket, path FROM imagen.images WHERE job_id = %s", job_id)[0]
    assert lines["image"].endswith(f" in {bucket}/{path}") and path.endswith(f"/{job_id}.png"), lines
    file = Path(lines["file"].split()[1])
    assert file == tmp_path / "storage" / bucket / path and file.is_file(), lines


def test_smoke_json_rounds_times_to_a_hundredth_of_a_millisecond(
    db_url: str, pipeline: Any, tmp_path: Path
) -> None:
    pipeline()
    result = run_imagen("smoke", "--json", env=clean_env(IMAGEN_DATABASE_URL=db_url), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    for key in ("pickup_ms", "total_ms", "observed_ms"):
        assert data[key] == round(data[key], 2), data
    assert data["bucket"] == "imagen" and data["path"].endswith(f"/{data['job_id']}.png")


def test_smoke_that_gives_up_says_why_in_one_line_and_cancels_its_job(db_url: str, tmp_path: Path) -> None:
    result = run_imagen(
        "smoke", "--timeout", "0.5", env=clean_env(IMAGEN_DATABASE_URL=db_url), cwd=tmp_path
    )  # no listener runs
    assert result.returncode == 1, explain(result)
    (line,) = result.stderr.strip().splitlines()
    assert line.endswith(
        "was still pending after 0.5 s (no listener claimed it: is `imagen listen` running on this"
        " database?); the smoke cancelled it"
    ), line
    assert "status   pending after 0.5 s: gave up and cancelled the job" in result.stdout
    assert query(db_url, "SELECT status FROM imagen.jobs") == [("cancelled",)]


def test_smoke_exits_one_with_the_jobs_error_when_it_fails(
    db_url: str, pipeline: Any, tmp_path: Path
) -> None:
    pipeline()
    result = run_imagen(
        "smoke", "--params", '{"backend": "mock", "fail": "permanent"}',
        env=clean_env(IMAGEN_DATABASE_URL=db_url), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "ended failed: generation failed: mock backend: simulated permanent failure" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_the_whole_pipeline_on_throwaway_servers_even_with_a_configured_env(
    db_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A .env in the folder is someone's real pipeline: the demo leaves it alone unless --use-env."""
    (tmp_path / ".env").write_text(f"IMAGEN_DATABASE_URL={db_url}\nIMAGEN_REDIS_URL={redis_url}\n")
    redis_keys = redis.Redis.from_url(redis_url).dbsize()
    result = run_imagen(
        "demo", "--jobs", "4", "--workdir", str(tmp_path / "demo"), env=clean_env(), cwd=tmp_path, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert (
        "postgres: started a throwaway server on port" in out
        and "IMAGEN_DATABASE_URL is set: left alone" in out
    )
    assert (
        "redis:    started a throwaway server on port" in out and "IMAGEN_REDIS_URL is set: left alone" in out
    )
    assert "inserted: 4 job(s)" in out
    statuses = [
        line.split()[1] for line in out.splitlines() if len(line) > 36 and line[8] == "-" and line[13] == "-"
    ]
    assert sorted(statuses) == ["done", "done", "done", "failed"]
    assert "unknown params key(s): sise" in out
    images = sorted((tmp_path / "demo" / "storage").rglob("*.png"))
    assert len(images) == 3
    assert all(str(image) in out for image in images)
    # Nothing reached the configured servers.
    assert query(db_url, "SELECT count(*) FROM imagen.jobs") == [(0,)]
    assert redis.Redis.from_url(redis_url).dbsize() == redis_keys


def test_demo_with_use_env_names_a_server_that_does_not_answer_in_one_line(
    db_url: str, tmp_path: Path
) -> None:
    env = clean_env(IMAGEN_DATABASE_URL=db_url, IMAGEN_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    result = run_imagen("demo", "--use-env", "--workdir", str(tmp_path / "demo"), env=env, cwd=tmp_path)
    assert result.returncode == 75, explain(result)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("imagen: redis at IMAGEN_REDIS_URL does not answer: "), line
    assert query(db_url, "SELECT count(*) FROM imagen.jobs") == [(0,)]


def test_demo_with_use_env_runs_on_the_configured_servers(
    db_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = clean_env(IMAGEN_DATABASE_URL=db_url, IMAGEN_REDIS_URL=redis_url)
    result = run_imagen(
        "demo",
        "--use-env",
        "--jobs",
        "1",
        "--workdir",
        str(tmp_path / "demo"),
        env=env,
        cwd=tmp_path,
        timeout=180,
    )
    assert result.returncode == 0, explain(result)
    assert "postgres: using IMAGEN_DATABASE_URL (--use-env)" in result.stdout
    assert query(db_url, "SELECT status FROM imagen.jobs") == [("done",)]
