"""The pipeline syncing to Supabase Storage (a local double that speaks its REST API), and a live run."""

from __future__ import annotations

import os
import uuid
from typing import Any

import psycopg
import pytest

from tests.fake_storage import DEFAULT_BUCKET, DEFAULT_KEY, fake_storage
from tests.integration.rows import query
from tests.integration.test_pipeline_e2e import submit, wait_terminal


def test_job_syncs_to_supabase_storage_with_upsert_at_its_deterministic_path(
    db_url: str, pipeline: Any
) -> None:
    with fake_storage() as storage:
        procs = pipeline(
            IMAGEN_STORAGE="supabase", SUPABASE_URL=storage.url, SUPABASE_SERVICE_ROLE_KEY=DEFAULT_KEY
        )
        owner = uuid.uuid4()
        job_id = submit(db_url, "a lighthouse", {"backend": "mock", "size": "48x48"}, owner)
        done = wait_terminal(db_url, job_id, procs)
        assert done["status"] == "done", done["error"]
        path = f"{owner}/{job_id}.png"
        assert (DEFAULT_BUCKET, path) in storage.objects
        data, content_type = storage.objects[(DEFAULT_BUCKET, path)]
        assert content_type == "image/png" and data.startswith(b"\x89PNG")
        (upload,) = storage.requests_to("POST")
        assert upload.headers.get("x-upsert") == "true"
        assert query(db_url, "SELECT bucket, path FROM imagen.images WHERE job_id = %s", job_id) == [
            (DEFAULT_BUCKET, path)
        ]


def test_transient_storage_outage_is_retried_then_the_job_succeeds(db_url: str, pipeline: Any) -> None:
    with fake_storage() as storage:
        storage.fail_next(2, 503)
        procs = pipeline(
            IMAGEN_STORAGE="supabase", SUPABASE_URL=storage.url, SUPABASE_SERVICE_ROLE_KEY=DEFAULT_KEY,
            IMAGEN_STAGE_RETRIES="3",
        )  # fmt: skip
        job_id = submit(db_url, "after the outage", {"backend": "mock", "size": "32x32"})
        done = wait_terminal(db_url, job_id, procs)
        assert done["status"] == "done", done["error"]
        assert len(storage.requests_to("POST")) == 3
        assert "503" in (done["last_error"] or "") or done["last_error"] is None
        assert len(storage.objects) == 1


def test_permanent_storage_refusal_fails_the_job_without_retrying(db_url: str, pipeline: Any) -> None:
    with fake_storage() as storage:
        storage.fail_next(5, 403)
        procs = pipeline(
            IMAGEN_STORAGE="supabase", SUPABASE_URL=storage.url, SUPABASE_SERVICE_ROLE_KEY=DEFAULT_KEY
        )
        job_id = submit(db_url, "refused", {"backend": "mock", "size": "32x32"})
        failed = wait_terminal(db_url, job_id, procs)
        assert failed["status"] == "failed"
        assert failed["error"].startswith("sync failed: storage upload imagen/")
        assert DEFAULT_KEY not in failed["error"]
        assert len(storage.requests_to("POST")) == 1


LIVE = os.environ.get("IMAGEN_WORKER_INTEGRATION") == "1" and all(
    os.environ.get(k) for k in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "IMAGEN_DATABASE_URL")
)


@pytest.mark.live
@pytest.mark.skipif(
    not LIVE,
    reason="set IMAGEN_WORKER_INTEGRATION=1, SUPABASE_URL, SUPABASE_SERVICE_ROLE_KEY, IMAGEN_DATABASE_URL",
)
def test_live_supabase_job_reaches_done_with_image_row_and_storage_object(pipeline_live: Any) -> None:
    """One mock job through the full pipeline against a real Supabase project, then cleaned up."""
    from imagen import jobs
    from imagen.config import load_settings
    from imagen.storage import SupabaseStorage

    settings = load_settings()
    url = settings.require_database_url()
    storage = SupabaseStorage(
        str(settings.supabase_url), settings.supabase_service_role_key.get_secret_value(), settings.bucket
    )  # type: ignore[union-attr]
    owner = settings.owner_user_id or uuid.uuid4()
    procs = pipeline_live(url)
    with psycopg.connect(url, autocommit=True) as conn:
        job_id = jobs.submit_job(
            conn, owner, "imagen live test", {"backend": "mock", "size": "64x64"}, as_owner=False
        )
    try:
        done = wait_terminal(url, job_id, procs, timeout=120)
        assert done["status"] == "done", done["error"]
        image = query(url, "SELECT id, bucket, path FROM imagen.images WHERE job_id = %s", job_id)
        assert image and image[0][0] == done["image_id"]
        assert storage._client.storage.from_(storage.bucket).exists(image[0][2])
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            paths = [
                r[0] for r in conn.execute("SELECT path FROM imagen.images WHERE job_id = %s", (job_id,))
            ]
            conn.execute("UPDATE imagen.jobs SET image_id = NULL WHERE id = %s", (job_id,))
            conn.execute("DELETE FROM imagen.images WHERE job_id = %s", (job_id,))
            conn.execute("DELETE FROM imagen.usage WHERE job_id = %s", (job_id,))
            conn.execute("DELETE FROM imagen.jobs WHERE id = %s", (job_id,))
        for path in paths:
            storage.delete(path)


@pytest.fixture
def pipeline_live(tmp_path: Any, redis_url: str) -> Any:
    from imagen.devtools.runner import PipelineProcesses, pipeline_env
    from tests.integration.conftest import listener_ready, workers_ready
    from tests.waiting import wait_until

    started: list[PipelineProcesses] = []

    def start(url: str) -> PipelineProcesses:
        env = pipeline_env(url, redis_url, tmp_path, IMAGEN_STORAGE="supabase")
        for key in ("SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY", "IMAGEN_BUCKET"):
            if os.environ.get(key):
                env[key] = os.environ[key]
        procs = PipelineProcesses(env, tmp_path / "logs")
        started.append(procs)
        w = procs.start_workers()
        wait_until(lambda: workers_ready(w), timeout=30, message=procs.logs())
        procs.start_listener()
        wait_until(lambda: listener_ready(url), timeout=30, message=procs.logs())
        return procs

    yield start
    for procs in started:
        procs.stop()
