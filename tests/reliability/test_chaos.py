"""Processes killed with SIGKILL at each point of a job's life, and the LISTEN backend terminated.

Every scenario ends with the one invariant (harness.check_invariants): every job
terminal, one image and one object per done job, nothing for the others, no job
running past lease + poll, no hand-off key outliving its TTL, nothing done twice.
A message that a killed worker had taken stays in Dramatiq's acks set until its
heartbeat timeout (60 s); the lease rescue (3 s here) is what recovers those jobs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from imagen.broker import GENERATE_QUEUE
from imagen.devtools.runner import listeners_listening
from tests.reliability.harness import Harness
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

MOCK = {"backend": "mock", "size": "16x16"}


def _running_ids(h: Harness) -> list[Any]:
    return [r[0] for r in h.query("SELECT id FROM imagen.jobs WHERE status = 'running'")]


def test_listener_sigkill_mid_drain_loses_no_job(harness: Callable[..., Harness]) -> None:
    # The kill must land between a committed claim and its forward, every run: Redis is paused
    # (SIGSTOP), so the listener's forward blocks right after its claim commits, and it is killed
    # there. Those jobs are running in the database with no message anywhere; the lease rescue
    # must bring each back. (Left to timing, the kill landed after the forwards in some runs.)
    h = harness(max_in_flight=5000, claim_batch=200)
    listener = h.start_listener()
    redis_proc = h.servers.redis.proc
    assert redis_proc is not None
    os.kill(redis_proc.pid, signal.SIGSTOP)
    try:
        ids = h.insert_backlog(3000, MOCK)
        wait_until(lambda: h.counts()["running"] >= 1, timeout=15, message="a claim committed")
        h.kill(listener)
    finally:
        os.kill(redis_proc.pid, signal.SIGCONT)
    fault = time.monotonic()
    counts = h.counts()
    queued = redis.Redis.from_url(h.redis_url).hlen(f"dramatiq:{GENERATE_QUEUE}.msgs")
    unforwarded = counts["running"] - queued
    assert unforwarded > 0 and counts["pending"] > 0, f"no claim was caught unforwarded: {counts}, {queued}"
    in_flight = _running_ids(h)
    # Restarted with the default in-flight cap, so no forwarded job waits in Redis past its lease.
    h.retune(max_in_flight=64, claim_batch=100)
    h.start_workers(1, threads=8)
    h.start_listener()
    recovery = h.wait_terminal(in_flight, 60)
    h.figures.update(
        claimed_at_kill=counts["running"], pending_at_kill=counts["pending"],
        claimed_not_forwarded=unforwarded, recovery_s=round(time.monotonic() - fault, 1),
        in_flight_terminal_s=round(recovery, 1),
    )  # fmt: skip
    figures = h.finish(deadline=90)
    assert figures["jobs"] == len(ids)
    assert figures["rescued_jobs"] >= unforwarded, "claimed-but-unforwarded jobs came back by rescue"


@pytest.mark.parametrize("stage", ["generating", "syncing", "finalizing"])
def test_worker_sigkill_in_stage_every_job_done_once(harness: Callable[..., Harness], stage: str) -> None:
    h = harness()
    if stage != "generating":
        # A worker on every queue runs sync and finalize chained inside the generation message (so
        # the kill in generation covers that path); these two take the per-stage queues.
        h.set_env(IMAGEN_CHAIN_STAGES="false")
    # A slow provider holds jobs in generation; the other stages are caught in the flow of a backlog.
    params = {**MOCK, "delay_ms": 250} if stage == "generating" else MOCK
    threads = 8
    workers = h.start_workers(1, threads)
    h.start_listener()
    ids = h.insert_backlog(160 if stage == "generating" else 300, params)
    caught, tries = 0, 0
    need = 4 if stage == "generating" else 1
    while not caught:
        tries += 1
        assert tries <= 6, f"never caught a job in {stage}"
        h.wait(lambda: h.running_by_stage()[stage] >= need, 30, f"jobs in {stage}")
        h.kill(workers)
        caught = h.running_by_stage()[stage]
        if not caught:
            workers = h.start_workers(1, threads)
    at_kill = dict(h.running_by_stage())
    in_flight = _running_ids(h)
    h.start_workers(1, threads)
    recovery = h.wait_terminal(in_flight, 60)
    h.figures.update(
        stage=stage, kills=tries, running_at_kill=at_kill, in_flight_at_kill=len(in_flight),
        recovery_s=round(recovery, 1),
    )  # fmt: skip
    figures = h.finish(deadline=90)
    assert figures["jobs"] == len(ids)
    assert figures["rescued_jobs"] >= 1, "the dead worker's jobs came back through the lease rescue"


def test_listener_backends_terminated_repeatedly_notify_still_wakes_it(
    harness: Callable[..., Harness],
) -> None:
    # The safety poll is 30 s here, so a pickup under a second proves NOTIFY woke the listener.
    h = harness(poll_interval=30)
    h.start_workers(1, threads=8)
    h.start_listener()
    rounds, ids, probes, reconnect_s = 6, [], [], []
    for round_ in range(rounds):
        batch = h.insert_backlog(30, MOCK)
        ids += batch
        # Every listener backend, and on odd rounds the workers' too, terminated mid-drain.
        names = "'imagen-listener', 'imagen-listener-claims'" + (", 'imagen-actors'" if round_ % 2 else "")
        killed = h.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = current_database() AND application_name IN ({names})"
        )
        assert killed and all(ok for (ok,) in killed)
        started = time.monotonic()
        h.wait(lambda: h.listeners_connected() >= 1, 15, "listener reconnected")
        h.wait(lambda: listeners_listening(h.db_url) >= 1, 15, "LISTEN re-established")
        reconnect_s.append(time.monotonic() - started)
        h.wait_terminal(batch, 30)
        # Inserted once the LISTEN is back: only a notification can wake the listener for these.
        probe = h.insert_backlog(5, MOCK, owners=1)
        probes += probe
        h.wait_terminal(probe, 10)
    pickup = "SELECT extract(epoch FROM max(claimed_at - created_at)) FROM imagen.jobs WHERE id = ANY(%s)"
    max_pickup, probe_pickup = float(h.scalar(pickup, ids)), float(h.scalar(pickup, probes))
    h.figures.update(
        terminations=rounds, max_reconnect_s=round(max(reconnect_s), 2),
        max_pickup_mid_drain_s=round(max_pickup, 2), max_pickup_after_reconnect_s=round(probe_pickup, 2),
    )  # fmt: skip
    h.finish(deadline=30)
    assert max_pickup < 5, f"a job killed mid-drain waited {max_pickup:.1f}s: the catch-up drain missed it"
    assert probe_pickup < 1, f"pickup took {probe_pickup:.1f}s after a reconnect: the poll did it, not NOTIFY"
    assert h.all_log_text().count("lost its database connection") >= rounds
