"""Integration fixtures: the real pipeline processes on the test's database and Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imagen.devtools.runner import PipelineProcesses, Proc, listeners_listening, pipeline_env
from tests.waiting import wait_until


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath) or "tests/reliability" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


FAST = {
    "IMAGEN_POLL_INTERVAL": "5",
    "IMAGEN_RETRY_MIN_BACKOFF_MS": "20",
    "IMAGEN_RETRY_MAX_BACKOFF_MS": "200",
    "IMAGEN_STAGE_RETRIES": "2",
    "dramatiq_restart_delay": "500",
    # The tests simulate slow and failing providers with the mock's delay_ms and fail.
    "IMAGEN_JOB_TEST_OPTIONS": "true",
}


def listener_ready(db_url: str, count: int = 1) -> bool:
    """True once `count` listeners hold a LISTEN on imagen_jobs."""
    return listeners_listening(db_url) >= count


def workers_ready(proc: Proc, count: int = 1) -> bool:
    return proc.ready_count() >= count


@pytest.fixture
def pipeline(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[Callable[..., PipelineProcesses]]:
    """Factory: start a real `imagen listen` and `dramatiq imagen.actors` with extra env; stopped after the test."""
    started: list[PipelineProcesses] = []

    def start(*, listeners: int = 1, workers: int = 1, threads: int = 4, **env: str) -> PipelineProcesses:
        procs = PipelineProcesses(
            pipeline_env(db_url, redis_url, tmp_path, **{**FAST, **env}), tmp_path / "logs"
        )
        started.append(procs)
        for _ in range(workers):
            w = procs.start_workers(processes=1, threads=threads)
            wait_until(lambda w=w: workers_ready(w), timeout=30, message=f"workers ready\n{procs.logs()}")
        for _ in range(listeners):
            procs.start_listener()
        wait_until(
            lambda: listener_ready(db_url, listeners), timeout=30, message=f"listener ready\n{procs.logs()}"
        )
        return procs

    yield start
    # SIGKILL, not SIGTERM: a graceful Dramatiq stop costs about 3 s per test (its master and worker
    # processes each poll once a second), and the test has checked what it proves by now. Graceful
    # stops are proven by the tests that send SIGTERM themselves (test_pipeline_e2e, the acceptance
    # tests), as in the reliability harness.
    for procs in started:
        for proc in procs.procs:
            proc.kill_group()
        for proc in procs.procs:
            proc.popen.wait()


class RecordingBroker:
    """Captures the messages a stage sends instead of enqueueing them."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...]]] = []
        self.delays: list[int | None] = []

    def enqueue(self, message: Any, *, delay: int | None = None) -> Any:
        self.sent.append((message.actor_name, tuple(message.args)))
        self.delays.append(delay)
        return message

    def enqueue_many(self, messages: list[Any]) -> list[Any]:
        return [self.enqueue(message) for message in messages]
