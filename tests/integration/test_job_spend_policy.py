"""A job's params cannot raise what one image costs past what the operator offers.

docs/security.md R16: params.quality multiplies an OpenAI image's price, so a job row
(written by any signed-in user) gets only the qualities in IMAGEN_JOB_OPENAI_QUALITIES
(default: IMAGEN_OPENAI_QUALITY alone). The real OpenAI client is pointed at a loopback
fake, so "no provider call" is what the provider saw, not what our code says it did.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from imagen import jobs
from imagen.config import Settings
from imagen.stages import StageContext, run_generate
from tests.fake_providers import ScriptedResponse, fake_provider, isolate_provider_env, png_b64
from tests.integration.conftest import RecordingBroker

IMAGES_RESPONSE = {
    "created": 1764000000,
    "output_format": "png",
    "quality": "low",
    "size": "1024x1024",
    "data": [{"b64_json": png_b64(16, 16)}],
    "usage": {"input_tokens": 5, "output_tokens": 100, "total_tokens": 105},
}


def _run_openai_job(
    db_url: str, redis_url: str, tmp_path: Path, provider_url: str, params: dict[str, Any]
) -> tuple[str, str | None, int]:
    """Submit and run one openai job through the generation stage; its status, error and usage rows."""
    settings = Settings(
        _env_file=None, database_url=db_url, redis_url=redis_url, storage="local",
        storage_dir=tmp_path / "storage", output_dir=tmp_path / "out", listener_metrics_port=0,
        backend="openai", openai_api_key="sk-test", openai_base_url=provider_url, openai_quality="low",
        stage_retries=0,
    )  # type: ignore[call-arg]  # fmt: skip
    with psycopg.connect(db_url, autocommit=True) as conn:
        job_id = jobs.submit_job(conn, uuid.uuid4(), "a lighthouse", params)
        (claim,) = jobs.claim_jobs(conn, 1)
    ctx = StageContext(settings, RecordingBroker())
    try:
        run_generate(ctx, str(job_id), claim.attempt)
    finally:
        ctx.close()
    with psycopg.connect(db_url, autocommit=True) as conn:
        status, error = conn.execute(
            "SELECT status, error FROM imagen.jobs WHERE id = %s", (job_id,)
        ).fetchone() or ("", None)
        (calls,) = conn.execute(
            "SELECT count(*) FROM imagen.usage WHERE job_id = %s", (job_id,)
        ).fetchone() or (0,)
    return status, error, calls


def test_a_job_asking_for_a_quality_the_operator_does_not_offer_fails_before_any_provider_call(
    db_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_provider_env(monkeypatch)
    with fake_provider() as provider:
        provider.reply(ScriptedResponse(body=IMAGES_RESPONSE))
        status, error, calls = _run_openai_job(
            db_url, redis_url, tmp_path, provider.url, {"quality": "high", "size": "1024x1024"}
        )
        assert status == "failed", error
        assert error == (
            "generation failed: quality 'high' is not offered for openai jobs on this server;"
            " jobs may use: low (the operator can add it to IMAGEN_JOB_OPENAI_QUALITIES)"
        )
        assert provider.requests == [] and calls == 0, "refused before the provider was called"

        # The same job at the operator's quality reaches the provider: the refusal above was the policy.
        status, error, calls = _run_openai_job(
            db_url, redis_url, tmp_path, provider.url, {"quality": "low", "size": "1024x1024"}
        )
        assert [request.body["quality"] for request in provider.requests] == ["low"], error
        assert calls == 1
