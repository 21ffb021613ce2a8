"""Owner quotas, enforced by the generation stage before the provider call, on real PostgreSQL.

The stage runs in-process (as in test_stages.py); one test runs the real listener and
workers. "No provider call" is checked through imagen.usage: every call writes a row.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from imagen import jobs
from imagen.config import Settings
from imagen.stages import StageContext, run_generate
from tests.cli import clean_env, explain, run_imagen
from tests.integration.conftest import RecordingBroker
from tests.integration.rows import job_row, query, scalar
from tests.waiting import wait_until

MOCK = {"backend": "mock", "size": "32x32"}


def make_ctx(db_url: str, redis_url: str, tmp_path: Path, **quota: Any) -> StageContext:
    settings = Settings(
        database_url=db_url, redis_url=redis_url, storage="local", storage_dir=tmp_path / "storage",
        output_dir=tmp_path / "out", listener_metrics_port=0, **quota,
    )  # fmt: skip
    ctx = StageContext(settings, RecordingBroker())
    ctx.chain_for_worker(None)  # sync and finalize in the same call: the job ends done
    return ctx


@pytest.fixture
def stage_ctx(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[Callable[..., StageContext]]:
    """make(**quota): a stage context with these quota settings, closed when the test ends."""
    made: list[StageContext] = []

    def make(**quota: Any) -> StageContext:
        made.append(make_ctx(db_url, redis_url, tmp_path, **quota))
        return made[-1]

    yield make
    for ctx in made:
        ctx.close()


def override(db_url: str, owner: uuid.UUID, daily_images: int) -> None:
    """The operator's imagen.owner_quotas row for `owner`."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "insert into imagen.owner_quotas (owner_user_id, daily_images) values (%s, %s)",
            (owner, daily_images),
        )


def spend(db_url: str, owner: uuid.UUID, images: int, cost: float, *, days_ago: int = 0) -> None:
    """Usage rows as earlier provider calls of `owner` wrote them."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "insert into imagen.usage (owner_user_id, backend, model, images, cost_usd, ok, created_at)"
            " values (%s, 'openai', 'gpt-image-2', %s, %s, true, now() - make_interval(days => %s))",
            (owner, images, cost, days_ago),
        )


def run_job(
    ctx: StageContext, db_url: str, owner: uuid.UUID, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        jobs.submit_job(conn, owner, "a cat", params or MOCK)
        (claim,) = jobs.claim_jobs(conn, 1)
    run_generate(ctx, str(claim.job_id), claim.attempt)
    row = job_row(db_url, claim.job_id)
    assert row is not None
    return row


def calls_of(db_url: str, job_id: uuid.UUID) -> int:
    return int(scalar(db_url, "select count(*) from imagen.usage where job_id = %s", job_id))


def test_job_over_the_daily_image_quota_fails_without_a_provider_call(
    db_url: str, stage_ctx: Callable[..., StageContext]
) -> None:
    ctx = stage_ctx(owner_daily_images=3)
    owner = uuid.uuid4()
    spend(db_url, owner, 3, 0.1)
    row = run_job(ctx, db_url, owner)
    assert row["status"] == "failed"
    assert row["error"] == "generation failed: daily image quota of 3 reached; resets at 00:00 UTC"
    assert calls_of(db_url, row["id"]) == 0


def test_images_made_yesterday_do_not_count(db_url: str, stage_ctx: Callable[..., StageContext]) -> None:
    ctx = stage_ctx(owner_daily_images=3)
    owner = uuid.uuid4()
    spend(db_url, owner, 50, 5.0, days_ago=1)
    row = run_job(ctx, db_url, owner)
    assert row["status"] == "done", row["error"]
    assert calls_of(db_url, row["id"]) == 1


def test_job_over_the_daily_cost_quota_fails_and_other_owners_are_unaffected(
    db_url: str, stage_ctx: Callable[..., StageContext]
) -> None:
    ctx = stage_ctx(owner_daily_cost_usd=1.0)
    spender, other = uuid.uuid4(), uuid.uuid4()
    spend(db_url, spender, 4, 1.25)
    spend(db_url, other, 4, 0.5)
    refused = run_job(ctx, db_url, spender)
    assert refused["status"] == "failed"
    assert refused["error"] == (
        "generation failed: daily cost quota of $1.00 reached ($1.25 used); resets at 00:00 UTC"
    )
    assert calls_of(db_url, refused["id"]) == 0
    assert run_job(ctx, db_url, other)["status"] == "done"


def test_an_override_row_replaces_the_default_for_its_owner_only(
    db_url: str, stage_ctx: Callable[..., StageContext]
) -> None:
    ctx = stage_ctx(owner_daily_images=1)
    vip, plain = uuid.uuid4(), uuid.uuid4()
    spend(db_url, vip, 5, 0.0)
    spend(db_url, plain, 1, 0.0)
    override(db_url, vip, 100)
    assert run_job(ctx, db_url, vip)["status"] == "done"
    assert run_job(ctx, db_url, plain)["status"] == "failed"


def test_an_override_limits_an_owner_when_quotas_are_off_by_default(
    db_url: str, stage_ctx: Callable[..., StageContext]
) -> None:
    ctx = stage_ctx()
    limited, free = uuid.uuid4(), uuid.uuid4()
    spend(db_url, limited, 2, 0.0)
    spend(db_url, free, 500, 90.0)
    override(db_url, limited, 2)
    assert run_job(ctx, db_url, limited)["error"] == (
        "generation failed: daily image quota of 2 reached; resets at 00:00 UTC"
    )
    assert run_job(ctx, db_url, free)["status"] == "done"


def test_jobs_stats_shows_usage_against_quota_per_owner(db_url: str, tmp_path: Path) -> None:
    owner, vip = uuid.uuid4(), uuid.uuid4()
    spend(db_url, owner, 7, 0.42)
    spend(db_url, vip, 2, 0.1)
    override(db_url, vip, 100)
    env = clean_env(
        IMAGEN_DATABASE_URL=db_url, IMAGEN_OWNER_DAILY_IMAGES="50", IMAGEN_OWNER_DAILY_COST_USD="2"
    )
    out = run_imagen("jobs", "stats", env=env, cwd=tmp_path)
    assert out.returncode == 0, explain(out)
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ")}
    assert "7 / 50" in lines[str(owner)] and "$0.42 / $2.00" in lines[str(owner)]
    assert "2 / 100" in lines[str(vip)] and "(override)" in lines[str(vip)]


def test_owner_over_quota_through_the_real_pipeline(db_url: str, pipeline: Any) -> None:
    procs = pipeline(IMAGEN_OWNER_DAILY_IMAGES="2")
    owner, other = uuid.uuid4(), uuid.uuid4()
    outcomes = []
    for who in (owner, owner, owner, other):
        with psycopg.connect(db_url, autocommit=True) as conn:
            job_id = jobs.submit_job(conn, who, "a cat", MOCK)
        outcomes.append(
            wait_until(
                lambda job_id=job_id: (
                    (r := job_row(db_url, job_id)) and r["status"] in ("done", "failed") and r
                ),
                timeout=30,
                message=f"job {job_id} ended\n{procs.logs()}",
            )
        )
    assert [r["status"] for r in outcomes] == ["done", "done", "failed", "done"]
    assert outcomes[2]["error"] == "generation failed: daily image quota of 2 reached; resets at 00:00 UTC"
    assert query(db_url, "select count(*) from imagen.usage where job_id = %s", outcomes[2]["id"]) == [(0,)]
