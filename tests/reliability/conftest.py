"""Reliability fixtures: private servers per module, a harness per scenario, the figures file.

The figures of every scenario land in `reliability-figures.json` under pytest's
base temp folder (and in $IMAGEN_RELIABILITY_FIGURES when set), and are printed
at the end of the run, so docs/reliability.md can quote a real run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import Harness, Servers, Tuning

FIGURES_NAME = "reliability-figures.json"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    """This module's own PostgreSQL and Redis on free ports: scenarios may stop and restart them."""
    started = Servers.start()
    try:
        yield started
    finally:
        started.cleanup()


@pytest.fixture(scope="session")
def figures_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / FIGURES_NAME


@pytest.fixture
def harness(
    servers: Servers, figures_file: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Harness]]:
    """Factory: a Harness on a fresh database and a flushed Redis; processes killed afterwards.

    Teardown uses SIGKILL: the scenario has been checked by then, and graceful stops
    are proven by the acceptance and integration tests.
    """
    made: list[Harness] = []

    def make(name: str | None = None, **tuning: Any) -> Harness:
        h = Harness(name or request.node.name, servers, tmp_path, figures_file, Tuning(**tuning))
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
        servers.drop_database(h.db_name)
    extra = os.environ.get("IMAGEN_RELIABILITY_FIGURES")
    if extra and figures_file.exists():
        shutil.copyfile(figures_file, extra)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    config = terminalreporter.config
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None:
        return
    path = Path(factory.getbasetemp()) / FIGURES_NAME
    if not path.exists():
        return
    terminalreporter.section("reliability figures")
    terminalreporter.write_line(str(path))
    for scenario, figures in json.loads(path.read_text()).items():
        terminalreporter.write_line(f"{scenario}: {json.dumps(figures, sort_keys=True)}")
