"""The pipeline syncing to Supabase Storage (a local double that speaks its REST API), and a live run."""

from __future__ import annotations

import os
import uuid
from typing import Any

import psycopg
import pytest

from imagen.errors import ImagenError
from tests.fake_storage import DEFAULT_BUCKET, DEFAULT_KEY, fake_storage
from tests.integration.live import LiveRunRefused, choose_pipeline
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
    """One mock job, inserted as the UI inserts it, through the pipeline of a real Supabase project.

    The deployed pipeline takes it when one is running; otherwise the test starts its own
    processes, but only when no other job is pending or running (tests/integration/live.py).
    Clean-up removes what the job made and never hides the failure that came first.
    """
    from imagen import jobs
    from imagen.config import load_settings
    from imagen.db import check_schema, connect
    from imagen.storage import SupabaseStorage

    settings = load_settings()
    url = settings.require_database_url()
    key = settings.supabase_service_role_key
    assert key is not None
    storage = SupabaseStorage(str(settings.supabase_url), key.get_secret_value(), settings.bucket)
    try:
        storage.check_bucket()
        with connect(url, autocommit=True) as conn:
            check_schema(conn)
        mode = choose_pipeline(url)
    except (ImagenError, LiveRunRefused) as exc:
        pytest.fail(f"the live run cannot start: {exc}")
    procs = pipeline_live(url) if mode == "own" else None
    owner = settings.owner_user_id or uuid.uuid4()
    with connect(url, autocommit=True) as conn:
        job_id = jobs.submit_job(conn, owner, "imagen live test", {"backend": "mock", "size": "64x64"})
    failed = True
    try:
        done = wait_terminal(url, job_id, procs or _NoLogs(mode), timeout=120)
        assert done["status"] == "done", done["error"]
        image = query(url, "SELECT id, bucket, path FROM imagen.images WHERE job_id = %s", job_id)
        assert image and image[0][0] == done["image_id"]
        assert storage._client.storage.from_(storage.bucket).exists(image[0][2])
        failed = False
    finally:
        problems = _clean_up(url, storage, job_id)
        if problems and not failed:
            pytest.fail("clean-up after the live run failed: " + "; ".join(problems))
        for problem in problems:  # shown with the failure above, which stays the one reported
            print(f"clean-up after the live run failed too: {problem}")


class _NoLogs:
    def __init__(self, mode: str) -> None:
        self.mode = mode

    def logs(self) -> str:
        return f"(the {self.mode} pipeline: its logs are on its hosts)"


def _clean_up(url: str, storage: Any, job_id: uuid.UUID) -> list[str]:
    """Remove the job's rows and object; return what could not be removed instead of raising."""
    problems: list[str] = []
    paths: list[str] = []
    try:
        with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
            conn.execute(
                "UPDATE imagen.jobs SET status = 'cancelled' WHERE id = %s AND status IN ('pending', 'running')",
                (job_id,),
            )
            paths = [
                r[0] for r in conn.execute("SELECT path FROM imagen.images WHERE job_id = %s", (job_id,))
            ]
            conn.execute("UPDATE imagen.jobs SET image_id = NULL WHERE id = %s", (job_id,))
            conn.execute("DELETE FROM imagen.images WHERE job_id = %s", (job_id,))
            conn.execute("DELETE FROM imagen.usage WHERE job_id = %s", (job_id,))
            conn.execute("DELETE FROM imagen.jobs WHERE id = %s", (job_id,))
    except psycopg.Error as exc:
        problems.append(f"rows of job {job_id}: {exc}")
    for path in paths:
        try:
            storage.delete(path)
        except ImagenError as exc:
            problems.append(f"object {path}: {exc}")
    return problems


@pytest.fixture
def pipeline_live(tmp_path: Any, redis_url: str) -> Any:
    """Our own listener and workers (on a throwaway Redis), for a project with no deployed pipeline."""
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


def test_live_guard_uses_the_deployed_pipeline_when_a_listener_is_there(db_url: str) -> None:
    from imagen.listener import LISTEN_SQL

    submit(db_url, "another owner's job", {"backend": "mock"})
    with psycopg.connect(db_url, autocommit=True, application_name="Supavisor") as deployed:
        deployed.execute(LISTEN_SQL)
        assert choose_pipeline(db_url) == "deployed"


def test_live_guard_starts_its_own_pipeline_only_on_an_empty_queue(db_url: str) -> None:
    assert choose_pipeline(db_url) == "own"
    done = submit(db_url, "finished long ago", {"backend": "mock"})
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE imagen.jobs SET status = 'done' WHERE id = %s", (done,))
    assert choose_pipeline(db_url) == "own"


@pytest.mark.parametrize("status", ["pending", "running"])
def test_live_guard_refuses_to_start_a_listener_that_would_take_other_owners_jobs(
    db_url: str, status: str
) -> None:
    other = submit(db_url, "another owner's job", {"backend": "mock"})
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE imagen.jobs SET status = %s, attempt = 1 WHERE id = %s", (status, other))
    with pytest.raises(
        LiveRunRefused, match=r"no imagen listener is running on this database and 1 job\(s\)"
    ):
        choose_pipeline(db_url)
    assert query(db_url, "SELECT status FROM imagen.jobs") == [(status,)]


def test_bucket_check_names_a_missing_bucket_and_what_to_do() -> None:
    from imagen.errors import ConfigError
    from imagen.storage import SupabaseStorage

    with fake_storage() as storage:
        SupabaseStorage(storage.url, DEFAULT_KEY, DEFAULT_BUCKET, timeout=5).check_bucket()
        with pytest.raises(ConfigError, match="create the bucket 'nope'"):
            SupabaseStorage(storage.url, DEFAULT_KEY, "nope", timeout=5).check_bucket()
