"""Owners cancel their jobs while the pipeline works on them, in every stage.

A cancelled job is never generated again and keeps no image: no images row, no
storage object, whatever stage it was in when its owner cancelled it (the cancel
is the owner's own UPDATE through RLS, as the UI sends it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import psycopg
import pytest

from tests.reliability.harness import Harness

pytestmark = pytest.mark.slow

MOCK = {"backend": "mock", "size": "16x16"}


def cancel_as_owner(h: Harness, stage: str, limit: int) -> int:
    """Each owner of a job running in `stage` cancels it through RLS; returns how many were cancelled."""
    owned = h.query(
        "SELECT id, owner_user_id FROM imagen.jobs WHERE status = 'running' AND stage = %s LIMIT %s",
        stage,
        limit,
    )
    cancelled = 0
    with psycopg.connect(h.db_url) as conn:
        for job_id, owner in owned:
            with conn.transaction():
                conn.execute("SET LOCAL ROLE authenticated")
                claims = json.dumps({"sub": str(owner), "role": "authenticated"})
                conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (claims,))
                cancelled += conn.execute(
                    "UPDATE imagen.jobs SET status = 'cancelled' WHERE id = %s", (job_id,)
                ).rowcount
    return cancelled


@pytest.mark.parametrize("chained", [True, False], ids=["stages-chained", "stages-queued"])
def test_jobs_cancelled_in_every_stage_keep_no_image(harness: Callable[..., Harness], chained: bool) -> None:
    h = harness()
    if not chained:
        h.set_env(IMAGEN_CHAIN_STAGES="false")
    h.start_workers(1, threads=8)
    h.start_listener()
    h.insert_backlog(300, MOCK)
    # Chained, a job's upload and images row happen while its stage still reads 'generating'.
    stages = ("queued", "generating") + (() if chained else ("syncing", "finalizing"))
    by_stage = dict.fromkeys(stages, 0)
    started = time.monotonic()
    while h.unfinished() and time.monotonic() - started < 60:
        for stage in by_stage:
            by_stage[stage] += cancel_as_owner(h, stage, 2)
    h.figures.update(cancelled_by_stage=by_stage)
    figures = h.finish(deadline=60, expect_all_done=False)
    assert figures["cancelled"] == sum(by_stage.values())
    assert all(by_stage.values()), f"no cancel landed in some stage: {by_stage}"
