"""Metrics and logs an operator relies on: Prometheus from the listener and the workers, JSON log lines."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from imagen.devtools.servers import free_port
from tests.integration.test_pipeline_e2e import submit, wait_terminal
from tests.waiting import wait_until


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            return response.read().decode()
    except OSError:
        return ""


def test_listener_and_workers_export_prometheus_metrics(db_url: str, pipeline: Any) -> None:
    listener_port, worker_port = free_port(), free_port()
    procs = pipeline(
        IMAGEN_LISTENER_METRICS_PORT=str(listener_port),
        IMAGEN_WORKER_METRICS="1",
        dramatiq_prom_port=str(worker_port),
        dramatiq_prom_host="127.0.0.1",
    )
    job_id = submit(db_url, "measure me", {"backend": "mock", "size": "32x32"})
    assert wait_terminal(db_url, job_id, procs)["status"] == "done"
    listener = wait_until(
        lambda: "imagen_listener_claims_total 1.0" in (text := scrape(listener_port)) and text, timeout=10
    )
    assert 'imagen_listener_mode{mode="listening"} 1.0' in listener
    assert "imagen_listener_pickup_seconds_count 1.0" in listener
    workers = wait_until(
        lambda: "dramatiq_messages_total" in (text := scrape(worker_port)) and text,
        timeout=15,
        message=f"worker metrics\n{procs.logs()}",
    )
    assert 'actor_name="generate_stage"' in workers


def test_json_logs_carry_one_line_per_transition_with_job_fields(db_url: str, pipeline: Any) -> None:
    procs = pipeline(IMAGEN_LOG_FORMAT="json")
    job_id = submit(db_url, "log me", {"backend": "mock", "size": "32x32"})
    assert wait_terminal(db_url, job_id, procs)["status"] == "done"
    listener_log = next(p for p in procs.procs if p.name == "listener").log
    events = []
    for line in listener_log.read_text().splitlines():
        record = json.loads(line)  # every listener line is JSON
        if record.get("job_id") == str(job_id):
            events.append(record)
    assert [e["event"] for e in events] == ["claimed"]
    assert events[0]["attempt"] == 1 and events[0]["stage"] == "queued"
    workers = next(p for p in procs.procs if p.name == "workers")

    def worker_events() -> list[str]:
        lines = workers.log.read_text().splitlines()
        return [json.loads(line)["event"] for line in lines if line.startswith("{") and str(job_id) in line]

    # The row is done when the statement commits; the worker logs it just after.
    wait_until(lambda: "done" in worker_events(), timeout=10, message=f"done line\n{procs.logs()}")
    # A job's steps inside the worker are debug lines: at info, one line where it ends.
    assert worker_events() == ["done"]
    worker_log = workers.log.read_text()
    assert "log me" not in worker_log, "prompts are logged only at debug level"
