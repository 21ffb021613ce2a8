"""The database seam holds: only the PostgreSQL side of the store (and db.py) imports psycopg, so the
stages and the listener reach the database only through a JobStore."""

from __future__ import annotations

import ast
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
