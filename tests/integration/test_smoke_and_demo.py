"""The README's commands through the real CLI: `imagen smoke` against running processes, `imagen demo` from nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.cli import clean_env, run_imagen


def test_smoke_prints_pickup_and_total_and_exits_zero_when_done(
    db_url: str, pipeline: Any, tmp_path: Path
) -> None:
    pipeline()
    result = run_imagen("smoke", env=clean_env(IMAGEN_DATABASE_URL=db_url), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert lines["status"].split()[1] == "done"
    pickup_ms = float(lines["pickup"].split()[1])
    total_ms = float(lines["total"].split()[1])
    assert 0 <= pickup_ms <= total_ms < 10_000
    assert "image" in lines


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


def test_demo_runs_the_whole_pipeline_with_no_configuration(tmp_path: Path) -> None:
    result = run_imagen(
        "demo", "--jobs", "3", "--workdir", str(tmp_path / "demo"), env=clean_env(), cwd=tmp_path, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "started a throwaway server" in out
    statuses = [
        line.split()[1] for line in out.splitlines() if len(line) > 36 and line[8] == "-" and line[13] == "-"
    ]
    assert sorted(statuses) == ["done", "done", "done", "failed"]
    assert "unknown params key(s): sise" in out
    images = sorted((tmp_path / "demo" / "storage").rglob("*.png"))
    assert len(images) == 3
    assert all(str(image) in out for image in images)
