"""The README's commands through the real CLI: `imagen smoke` against running processes, `imagen demo` from nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("IMAGEN_", "SUPABASE_", "OPENAI_", "GEMINI_"))
    }
    env.update(extra)
    return env


def imagen(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagen", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_smoke_prints_pickup_and_total_and_exits_zero_when_done(
    db_url: str, pipeline: Any, tmp_path: Path
) -> None:
    pipeline()
    result = imagen("smoke", env=clean_env(IMAGEN_DATABASE_URL=db_url), cwd=tmp_path)
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
    result = imagen(
        "smoke", "--params", '{"backend": "mock", "fail": "permanent"}',
        env=clean_env(IMAGEN_DATABASE_URL=db_url), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "ended failed: generation failed: mock backend: simulated permanent failure" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_the_whole_pipeline_with_no_configuration(tmp_path: Path) -> None:
    result = imagen(
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
