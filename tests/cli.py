"""Running `python -m imagen ...` the way a user does: its own process, in a folder without a .env.

Nothing the person running the tests has configured leaks in: imagen, Supabase
and provider variables are dropped from the inherited environment, and a test
passes what it means to set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.fake_providers import PROVIDER_ENV_VARS

DROPPED_PREFIXES = ("IMAGEN_", "OPENAI_", "GEMINI_", "GOOGLE_", "SUPABASE_")


def clean_env(**extra: str) -> dict[str, str]:
    """The parent's environment without imagen, provider or Supabase variables, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(DROPPED_PREFIXES) and name not in PROVIDER_ENV_VARS
    }
    env.update(extra)
    return env


def run_imagen(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m imagen ARGS` in `cwd`, waited for, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "imagen", *args],
        env=env, cwd=cwd, input=input, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
