"""The database seam holds: only the PostgreSQL side of the store (and db.py) imports psycopg, so the
stages and the listener reach the database only through a JobStore. Directly (no import of psycopg in
their source) and transitively (importing their logic modules loads no psycopg: only the composition
roots, stages/context.py and listener/service.py, build the PostgreSQL store)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "imagen"
SEAMED = sorted(
    [*(ROOT / "stages").glob("*.py"), *(ROOT / "listener").glob("*.py")]
    + [ROOT / name for name in ("handoff.py", "quotas.py", "usage.py", "admission.py", "actors.py")]
)


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", SEAMED, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_stages_and_the_listener_import_no_psycopg(path: Path) -> None:
    drivers = {name for name in imported(path) if name.split(".")[0] in ("psycopg", "psycopg_pool")}
    assert drivers == set(), f"{path.name} reaches the database around the store: {sorted(drivers)}"


LOGIC = [
    *(
        f"imagen.stages.{name}"
        for name in ("generate", "sync", "finish", "chained", "images", "lease", "errors")
    ),
    *(f"imagen.listener.{name}" for name in ("claimer", "gate", "rescuer", "metrics")),
]
LOADED_DRIVERS = (
    "import sys, {module}; "
    "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('psycopg', 'psycopg_pool'))))"
)


@pytest.mark.parametrize("module", LOGIC)
def test_importing_the_stage_and_listener_logic_loads_no_psycopg(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LOADED_DRIVERS.format(module=module)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [], f"importing {module} loads the database driver: {done.stdout[:200]}"
