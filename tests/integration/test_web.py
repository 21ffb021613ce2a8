"""`imagen web`'s endpoints on a real database and Redis, through Starlette's test client."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from PIL import Image
from starlette.testclient import TestClient

from imagen.broker import GENERATE_QUEUE, SYNC_QUEUE, build_broker, stage_message
from imagen.config import Settings, load_settings
from imagen.errors import ConfigError
from imagen.listener import HEALTH_SQL, LISTEN_SQL
from imagen.store import PostgresJobStore
from imagen.store.queries import QUERIES
from imagen.web import WebOptions, create_app
from imagen.web.app import check_bind
from imagen.web.queries import capped_counts
from tests.cli import clean_env, run_imagen
from tests.waiting import wait_until

TOKEN = "a-test-token-0123456789abcdef"
LOCAL = "http://127.0.0.1"


def insert_job(db_url: str, prompt: str = "a red fox", **columns: Any) -> uuid.UUID:
    """A job row as the pipeline would leave it (columns as given), straight through SQL."""
    values = {"owner_user_id": uuid.uuid4(), "prompt": prompt, **columns}
    if "params" in values:
        values["params"] = json.dumps(values["params"])
    names = ", ".join(values)
    marks = ", ".join(f"%({k})s" for k in values)
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            f"INSERT INTO imagen.jobs ({names}) VALUES ({marks}) RETURNING id", values
        ).fetchone()
    assert row is not None
    return row[0]


def status_of(db_url: str, job_id: uuid.UUID) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT status FROM imagen.jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return str(row[0])


def settings_for(db_url: str, redis_url: str, storage_dir: Path) -> Settings:
    return load_settings(
        database_url=db_url, redis_url=redis_url, storage="local", storage_dir=storage_dir, web_token=None
    )


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return settings_for(db_url, redis_url, tmp_path / "storage")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app, base_url=LOCAL) as test_client:
        yield test_client


def csrf_of(client: TestClient) -> str:
    token: str = client.app.state.web.guard.csrf_token  # type: ignore[attr-defined]
    return token


def done_job_with_image(
    db_url: str, storage_dir: Path, size: tuple[int, int] = (320, 200)
) -> tuple[uuid.UUID, uuid.UUID]:
    """A done job with its image row, its stored PNG and a usage row, as the pipeline writes them."""
    owner = uuid.uuid4()
    job_id = insert_job(
        db_url,
        "a lighthouse at dusk",
        owner_user_id=owner,
        params={"backend": "mock", "size": f"{size[0]}x{size[1]}"},
        status="running",
        attempt=1,
    )
    path = f"{owner}/{job_id}.png"
    file = storage_dir / "imagen" / path
    file.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 40, 40)).save(file)
    with psycopg.connect(db_url, autocommit=True) as conn:
        image_row = conn.execute(
            "INSERT INTO imagen.images (owner_user_id, job_id, bucket, path, mime, width, height, bytes, prompt,"
            " backend, model) VALUES (%s, %s, 'imagen', %s, 'image/png', %s, %s, %s, 'a lighthouse at dusk',"
            " 'mock', 'mock-1') RETURNING id",
            (owner, job_id, path, size[0], size[1], file.stat().st_size),
        ).fetchone()
        assert image_row is not None
        conn.execute(
            "INSERT INTO imagen.usage (owner_user_id, job_id, backend, model, images, cost_usd, latency_ms, ok)"
            " VALUES (%s, %s, 'mock', 'mock-1', 1, 0.0400, 123, true)",
            (owner, job_id),
        )
        conn.execute(
            "UPDATE imagen.jobs SET status = 'done', image_id = %s, claimed_at = created_at + interval '20 ms',"
            " stage_times = jsonb_build_object('queued', created_at + interval '20 ms',"
            " 'generating', created_at + interval '30 ms', 'done', created_at + interval '200 ms'),"
            " finished_at = created_at + interval '200 ms' WHERE id = %s",
            (image_row[0], job_id),
        )
    return job_id, image_row[0]


def test_index_shows_newest_jobs_first_with_counts_times_and_failed_errors(
    client: TestClient, db_url: str
) -> None:
    older = insert_job(db_url, "an older job")
    failed = insert_job(
        db_url, "a job that failed", status="failed", error="generation failed: unknown backend 'x'"
    )
    newest = insert_job(db_url, "the newest job")
    page = client.get("/")
    assert page.status_code == 200
    html = page.text
    assert html.index(str(newest)) < html.index(str(failed)) < html.index(str(older))
    assert "generation failed: unknown backend &#39;x&#39;" in html
    assert 'id="count-pending">2<' in html and 'id="count-failed">1<' in html and 'id="count-done">0<' in html
    assert 'hx-get="/fragments/jobs?' in html and "/static/htmx.min.js" in html


def test_index_filters_by_status_owner_and_text(client: TestClient, db_url: str) -> None:
    owner = uuid.uuid4()
    mine = insert_job(db_url, "a 100% red fox", owner_user_id=owner)
    failed = insert_job(db_url, "a blue whale", status="failed", error="boom")
    other = insert_job(db_url, "a 100 red foxes")
    by_status = client.get("/fragments/jobs", params={"status": "failed"}).text
    assert str(failed) in by_status and str(mine) not in by_status
    by_owner = client.get("/", params={"owner": str(owner)}).text
    assert str(mine) in by_owner and str(other) not in by_owner
    # % in the text is a character, not a wildcard
    by_text = client.get("/", params={"q": "100% RED"}).text
    assert str(mine) in by_text and str(other) not in by_text


def test_text_filter_with_a_job_id_opens_that_job(client: TestClient, db_url: str) -> None:
    job_id = insert_job(db_url)
    answer = client.get("/", params={"q": str(job_id)}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == f"/jobs/{job_id}"


def test_bad_filters_are_named_and_ignored(client: TestClient, db_url: str) -> None:
    job_id = insert_job(db_url)
    page = client.get("/", params={"status": "exploded", "owner": "bob"})
    assert page.status_code == 200
    assert (
        "status &#39;exploded&#39; is not one of" in page.text
        and "owner &#39;bob&#39; is not a user id" in page.text
    )
    assert str(job_id) in page.text


def test_job_page_shows_prompt_params_timeline_usage_cost_and_image(
    client: TestClient, db_url: str, tmp_path: Path
) -> None:
    job_id, image_id = done_job_with_image(db_url, tmp_path / "storage")
    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200
    html = page.text
    assert "a lighthouse at dusk" in html and '"backend": "mock"' in html
    assert f'<img id="job-image" src="/images/{image_id}"' in html
    assert 'class="seg seg-pending"' in html and 'class="seg seg-generating"' in html
    assert "$0.0400" in html and "mock/mock-1" in html
    assert "hx-trigger" not in html.split('<section id="job"')[1].split(">")[0]  # a done job stops polling


def test_image_and_thumbnail_are_served_from_local_storage(
    client: TestClient, db_url: str, tmp_path: Path
) -> None:
    _, image_id = done_job_with_image(db_url, tmp_path / "storage", size=(320, 200))
    full = client.get(f"/images/{image_id}")
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(full.content)).size == (320, 200)
    thumb = client.get(f"/images/{image_id}/thumb")
    assert thumb.status_code == 200
    assert Image.open(io.BytesIO(thumb.content)).size == (160, 100)


def test_missing_image_file_and_unknown_ids_are_404(client: TestClient, db_url: str, tmp_path: Path) -> None:
    job_id, image_id = done_job_with_image(db_url, tmp_path / "storage")
    for file in (tmp_path / "storage").rglob("*.png"):
        file.unlink()
    missing = client.get(f"/images/{image_id}")
    assert missing.status_code == 404 and "missing from local storage" in missing.text
    assert client.get(f"/images/{uuid.uuid4()}").status_code == 404
    assert client.get("/images/not-a-uuid").status_code == 404
    assert client.get(f"/jobs/{uuid.uuid4()}").status_code == 404
    assert client.get(f"/jobs/{job_id}").status_code == 200


def test_retry_button_puts_a_failed_job_back_to_pending(client: TestClient, db_url: str) -> None:
    job_id = insert_job(db_url, status="failed", error="generation failed: boom", attempt=1)
    page = client.get(f"/jobs/{job_id}").text
    assert f'action="/jobs/{job_id}/retry"' in page and "/cancel" not in page
    answer = client.post(f"/jobs/{job_id}/retry", data={"csrf": csrf_of(client)}, follow_redirects=False)
    assert answer.status_code == 303
    assert status_of(db_url, job_id) == "pending"
    shown = client.get(answer.headers["location"]).text
    assert "failed -&gt; pending" in shown and f'action="/jobs/{job_id}/cancel"' in shown


def test_cancel_button_cancels_a_pending_job(client: TestClient, db_url: str) -> None:
    job_id = insert_job(db_url)
    answer = client.post(f"/jobs/{job_id}/cancel", data={"csrf": csrf_of(client)})
    assert answer.status_code == 200 and "pending -&gt; cancelled" in answer.text
    assert status_of(db_url, job_id) == "cancelled"


def test_refused_transition_says_why_like_the_cli(client: TestClient, db_url: str) -> None:
    job_id = insert_job(db_url, status="done")
    answer = client.post(f"/jobs/{job_id}/retry", data={"csrf": csrf_of(client)})
    assert answer.status_code == 409
    assert f"job {job_id} is done: only failed or cancelled jobs can be retried" in answer.text
    assert status_of(db_url, job_id) == "done"


def test_actions_without_the_csrf_token_or_from_another_site_change_nothing(
    client: TestClient, db_url: str
) -> None:
    job_id = insert_job(db_url)
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 403
    assert client.post(f"/jobs/{job_id}/cancel", data={"csrf": "guessed"}).status_code == 403
    cross = client.post(
        f"/jobs/{job_id}/cancel", data={"csrf": csrf_of(client)}, headers={"Origin": "https://evil.example"}
    )
    assert cross.status_code == 403
    assert client.get(f"/jobs/{job_id}/cancel").status_code == 405
    assert status_of(db_url, job_id) == "pending"


def test_read_only_hides_the_buttons_and_refuses_the_actions(settings: Settings, db_url: str) -> None:
    failed = insert_job(db_url, status="failed", error="boom")
    pending = insert_job(db_url)
    app = create_app(settings, WebOptions(read_only=True))
    with TestClient(app, base_url=LOCAL) as client:
        page = client.get(f"/jobs/{failed}").text
        assert "read-only" in page and "/retry" not in page
        assert "/cancel" not in client.get(f"/jobs/{pending}").text
        for job_id, action in ((failed, "retry"), (pending, "cancel")):
            refused = client.post(f"/jobs/{job_id}/{action}", data={"csrf": csrf_of(client)})
            assert refused.status_code == 403 and "read-only" in refused.text
    assert status_of(db_url, failed) == "failed" and status_of(db_url, pending) == "pending"


def test_token_is_required_on_every_request(settings: Settings, db_url: str, tmp_path: Path) -> None:
    job_id, image_id = done_job_with_image(db_url, tmp_path / "storage")
    app = create_app(settings, WebOptions(host="0.0.0.0"), token=TOKEN)
    paths = [
        "/",
        "/fragments/jobs",
        f"/jobs/{job_id}",
        f"/images/{image_id}",
        "/health",
        "/static/htmx.min.js",
    ]
    with TestClient(app, base_url="http://dashboard.example:9400") as client:
        for path in paths:
            assert client.get(path).status_code == 401, path
            assert (
                client.get(path, headers={"Authorization": "Bearer wrong-token-0123456789"}).status_code
                == 401
            )
            assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
        assert client.post(f"/jobs/{job_id}/retry", data={"csrf": csrf_of(client)}).status_code == 401
        assert TOKEN not in client.get("/").text
        login = client.get(f"/jobs/{job_id}?token={TOKEN}", follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == f"/jobs/{job_id}"
        assert "httponly" in login.headers["set-cookie"].lower()
        assert client.get("/health").status_code == 200  # the cookie now carries it


def test_without_a_token_only_loopback_host_names_are_served(client: TestClient) -> None:
    assert client.get("/").status_code == 200
    assert client.get("http://localhost:9400/").status_code == 200
    rebound = client.get("http://attacker.example/")
    assert rebound.status_code == 403


def test_binding_beyond_loopback_needs_a_long_token() -> None:
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)
    check_bind("0.0.0.0", TOKEN)
    with pytest.raises(ConfigError, match="IMAGEN_WEB_TOKEN"):
        check_bind("0.0.0.0", None)
    with pytest.raises(ConfigError, match="IMAGEN_WEB_TOKEN"):
        check_bind("192.168.1.20", None)
    with pytest.raises(ConfigError, match="too short"):
        check_bind("127.0.0.1", "short")


def test_cli_refuses_a_public_bind_without_a_token(db_url: str, tmp_path: Path) -> None:
    result = run_imagen("web", "--host", "0.0.0.0", env=clean_env(IMAGEN_DATABASE_URL=db_url), cwd=tmp_path)
    assert result.returncode == 78
    assert "IMAGEN_WEB_TOKEN" in result.stderr and "Traceback" not in result.stderr


def test_health_shows_listeners_queue_depths_in_flight_and_last_hour(
    client: TestClient, db_url: str, redis_url: str
) -> None:
    broker = build_broker(load_settings(redis_url=redis_url))
    broker.declare_queue(GENERATE_QUEUE)
    broker.declare_queue(SYNC_QUEUE)
    for i in range(3):
        broker.enqueue(stage_message("generate_stage", GENERATE_QUEUE, str(uuid.uuid4()), i))
    broker.enqueue(stage_message("sync_stage", SYNC_QUEUE, str(uuid.uuid4()), 1))
    broker.close()
    insert_job(db_url, status="running", stage="generating", attempt=1, claimed_at=_ago(5))
    finished = _ago(60)  # one moment for both, so they land in the same minute's bar
    for _ in range(2):
        insert_job(
            db_url,
            status="done",
            attempt=1,
            created_at=finished - timedelta(seconds=10),
            claimed_at=finished - timedelta(seconds=9.9),
            finished_at=finished,
        )
    with psycopg.connect(db_url, autocommit=True, application_name="Supavisor") as listener:
        listener.execute(LISTEN_SQL)
        # The listener's self-check runs on the same connection every 10 s: still one listener.
        listener.execute(HEALTH_SQL)
        html = client.get("/health").text
    cards = html.split('<div class="panels">')[0]
    assert 'id="listeners">1<' in cards and 'id="in-flight">1<' in cards, cards
    rows = {q: html.split(f'data-queue="{q}">')[1].split("</tr>")[0] for q in (GENERATE_QUEUE, SYNC_QUEUE)}
    assert '<td class="num">3</td>' in rows[GENERATE_QUEUE] and '<td class="num">1</td>' in rows[SYNC_QUEUE]
    assert "finished: done 2, failed 0" in html
    assert "<title>done 2</title>" in html  # a bar for the minute they finished
    # The listener left; its backend exits a moment after the client closes.
    wait_until(lambda: "none connected" in client.get("/fragments/health").text, timeout=10)


def test_health_names_an_unreachable_redis(db_url: str, tmp_path: Path) -> None:
    settings = settings_for(db_url, "redis://127.0.0.1:1/0", tmp_path)
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        page = client.get("/health")
    assert page.status_code == 200 and "Redis unreachable" in page.text


def test_counts_stop_at_the_cap(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, status) "
            "SELECT gen_random_uuid(), 'x', 'done' FROM generate_series(1, 30)"
        )
        counts = capped_counts(PostgresJobStore.from_url(db_url), cap=25)
    assert counts == {"pending": 0, "running": 0, "done": 25, "failed": 0, "cancelled": 0}


def _ago(seconds: float) -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC) - timedelta(seconds=seconds)


def test_newest_jobs_and_capped_counts_use_migration_010s_indexes(db_url: str) -> None:
    from imagen.web.queries import COUNT_CAP

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, status, created_at, finished_at)"
            " SELECT gen_random_uuid(), 'x', CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'done' END,"
            " now() - i * interval '1 s', now() - i * interval '1 s' FROM generate_series(1, 20000) i"
        )
        conn.execute("ANALYZE imagen.jobs")

        def plan(query: str, params: dict[str, Any]) -> str:
            return "\n".join(row[0] for row in conn.execute("EXPLAIN " + query, params).fetchall())

        base = {"statuses": None, "owner": None, "since": None, "pattern": None, "limit": 50}
        assert "jobs_created_idx" in plan(QUERIES["list_jobs"], base)
        # A rare status: its rows through jobs_status_created_idx, not a walk of every newer job.
        conn.execute(
            "UPDATE imagen.jobs SET status = 'cancelled' WHERE id IN (SELECT id FROM imagen.jobs LIMIT 10)"
        )
        conn.execute("ANALYZE imagen.jobs")
        assert "jobs_status_created_idx" in plan(QUERIES["list_jobs"], {**base, "statuses": ["cancelled"]})
        counts = plan(QUERIES["capped_counts"], {"cap": COUNT_CAP})
        # Rare statuses through their indexes; the dominant one (done) may be read in table order,
        # stopping at the cap either way.
        for index in ("jobs_claim_idx", "jobs_running_idx", "jobs_status_created_idx"):
            assert index in counts, counts
        assert "jobs_finished_idx" in plan(QUERIES["finished_window"], {"window": 3600.0, "by_minute": True})


def test_supabase_images_redirect_to_a_short_lived_signed_url(db_url: str, redis_url: str) -> None:
    import httpx

    from tests.fake_storage import DEFAULT_BUCKET, DEFAULT_KEY, fake_storage

    owner = uuid.uuid4()
    job_id = insert_job(db_url, owner_user_id=owner, status="done")
    path = f"{owner}/{job_id}.png"
    picture = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 90, 200)).save(picture, format="PNG")
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO imagen.images (owner_user_id, job_id, bucket, path, mime, width, height, bytes, prompt,"
            " backend, model) VALUES (%s, %s, %s, %s, 'image/png', 40, 30, %s, 'p', 'mock', 'm') RETURNING id",
            (owner, job_id, DEFAULT_BUCKET, path, len(picture.getvalue())),
        ).fetchone()
    assert row is not None
    with fake_storage() as storage:
        storage.objects[(DEFAULT_BUCKET, path)] = (picture.getvalue(), "image/png")
        settings = load_settings(
            database_url=db_url,
            redis_url=redis_url,
            storage="supabase",
            supabase_url=storage.url,
            supabase_service_role_key=DEFAULT_KEY,
            bucket=DEFAULT_BUCKET,
        )
        with TestClient(create_app(settings), base_url=LOCAL) as client:
            answer = client.get(f"/images/{row[0]}/thumb", follow_redirects=False)
            page = client.get(f"/jobs/{job_id}")
        assert answer.status_code == 302
        signed = answer.headers["location"]
        assert signed.startswith(f"{storage.url}/storage/v1/object/sign/{DEFAULT_BUCKET}/{owner}/")
        assert "token=" in signed and DEFAULT_KEY not in signed
        fetched = httpx.get(signed)  # what the browser does: no key, only the signature
        assert fetched.status_code == 200 and fetched.content == picture.getvalue()
        assert storage.url in page.headers["content-security-policy"]  # img-src allows the storage


def test_a_database_that_went_away_is_a_503_in_one_line(pg_admin_url: str, tmp_path: Path) -> None:
    info = psycopg.conninfo.conninfo_to_dict(pg_admin_url)
    info["dbname"] = f"imagen_gone_{uuid.uuid4().hex[:8]}"
    settings = settings_for(psycopg.conninfo.make_conninfo(**info), "redis://127.0.0.1:1/0", tmp_path)
    app = create_app(settings, WebOptions(database_timeout=1.0))
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as client:
        answer = client.get("/")
    assert answer.status_code == 503
    assert answer.text.startswith("database unavailable: ") and "\n" not in answer.text.strip()


def test_cli_says_in_one_line_when_the_database_is_unreachable(tmp_path: Path) -> None:
    env = clean_env(IMAGEN_DATABASE_URL="postgresql://postgres@127.0.0.1:1/imagen")
    result = run_imagen("web", "--port", "1", env=env, cwd=tmp_path)
    assert result.returncode == 75
    assert result.stderr.startswith("imagen: database error: ") and "Traceback" not in result.stderr
