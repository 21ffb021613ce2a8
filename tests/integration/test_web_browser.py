"""`imagen web` in a real browser: Debian's headless Chromium driven by Playwright.

The server is the real `imagen web` command in its own process, next to the real
pipeline (listener and Dramatiq workers) where a test needs jobs to finish.
Chromium is the system's (/usr/bin/chromium, `apt-get install chromium`), never
a browser Playwright downloads: these tests fail, not skip, when it is missing,
so CI cannot pass without them. Screenshots land in test-artifacts/ (or
IMAGEN_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from imagen import jobs
from imagen.devtools.runner import pipeline_env
from imagen.devtools.servers import free_port
from tests.integration.test_web import insert_job, status_of
from tests.waiting import wait_until

CHROMIUM = os.environ.get("IMAGEN_TEST_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps dialling Google's hosts, which this
# sandbox refuses (and CI machines may not reach).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("IMAGEN_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
TOKEN = "browser-test-token-0123456789"
# The page refreshes every second; the slack is for a machine loaded by other test runs.
APPEARS_WITHIN = 3.0


@dataclass
class WebServer:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"no Chromium at {CHROMIUM}: the browser tests need Debian's (apt-get install chromium) "
            "or IMAGEN_TEST_CHROMIUM pointing at one"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(15_000)
    tab = context.new_page()
    yield tab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    tab.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


@pytest.fixture
def web_server(db_url: str, redis_url: str, tmp_path: Path) -> Iterator[Callable[..., WebServer]]:
    """Factory: the real `imagen web` on a free port, over the pipeline fixture's database and storage."""
    started: list[WebServer] = []

    def start(*args: str, **env: str) -> WebServer:
        port = free_port()
        log = tmp_path / f"web-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "imagen", "web", "--port", str(port), *args],
                env=pipeline_env(db_url, redis_url, tmp_path, **env),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        server = WebServer(f"http://127.0.0.1:{port}", proc, log)
        started.append(server)

        def answering() -> bool:
            assert proc.poll() is None, f"imagen web exited\n{server.logs()}"
            try:
                return httpx.get(server.url + "/static/app.css", timeout=1).status_code in (200, 401)
            except httpx.HTTPError:
                return False

        wait_until(answering, timeout=30, interval=0.1, message=f"imagen web answering\n{server.logs()}")
        return server

    yield start
    for server in started:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def submit_as_owner(db_url: str, prompt: str, params: dict[str, Any]) -> uuid.UUID:
    """INSERT as the UI does: role authenticated, PostgREST's claims, row level security."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        return jobs.submit_job(conn, uuid.uuid4(), prompt, params)


def image_loaded(page: Any, selector: str) -> None:
    page.wait_for_function(
        "sel => { const img = document.querySelector(sel); return img && img.complete && img.naturalWidth > 0; }",
        arg=selector,
    )


@pytest.mark.serial
def test_job_inserted_through_sql_appears_without_a_reload_and_reaches_done_with_its_thumbnail(
    db_url: str, pipeline: Any, web_server: Callable[..., WebServer], page: Any
) -> None:
    from playwright.sync_api import expect

    procs = pipeline()
    server = web_server()
    page.goto(server.url + "/")
    expect(page.locator("p.empty")).to_be_visible()
    page.evaluate("window.stillTheSamePage = true")

    job_id = submit_as_owner(
        db_url, "a lighthouse at dusk", {"backend": "mock", "size": "256x192", "seed": 7}
    )
    inserted = time.monotonic()
    row = page.locator(f"#job-{job_id}")
    row.wait_for(state="visible", timeout=10_000)
    appeared = time.monotonic() - inserted
    assert appeared < APPEARS_WITHIN, f"the job appeared {appeared:.2f} s after its INSERT"

    expect(row).to_have_attribute("data-status", "done", timeout=30_000)
    image_loaded(page, f"#job-{job_id} td.thumb img")
    assert page.evaluate("window.stillTheSamePage") is True, "the page was reloaded"
    expect(page.locator("#count-done")).to_have_text("1")
    assert "done" in status_of(db_url, job_id), procs.logs()

    page.click(f"#job-{job_id} a.mono")
    expect(page.locator("#job h1 .status")).to_have_text("done")
    image_loaded(page, "#job-image")
    size = page.evaluate(
        "() => { const i = document.querySelector('#job-image'); return [i.naturalWidth, i.naturalHeight]; }"
    )
    assert size == [256, 192]
    expect(page.locator(".timeline .seg-generating")).to_have_count(1)


def test_failed_job_shows_its_error_and_retry_and_cancel_buttons_work(
    db_url: str, web_server: Callable[..., WebServer], page: Any
) -> None:
    from playwright.sync_api import expect

    server = web_server()
    failed = insert_job(
        db_url, "a job that failed", status="failed", error="generation failed: unknown backend 'x'"
    )
    page.goto(server.url + "/")
    expect(page.locator(f"#job-{failed} .error")).to_contain_text("unknown backend 'x'")

    page.goto(f"{server.url}/jobs/{failed}")
    expect(page.locator("button.cancel")).to_have_count(0)
    page.click("button.retry")
    expect(page.locator(".message")).to_have_text("failed -> pending")
    assert status_of(db_url, failed) == "pending"

    page.click("button.cancel")  # no listener runs: still pending
    expect(page.locator(".message")).to_have_text("pending -> cancelled")
    expect(page.locator("#job h1 .status")).to_have_text("cancelled")
    assert status_of(db_url, failed) == "cancelled"


def test_read_only_dashboard_shows_no_buttons_and_refuses_a_forged_post(
    db_url: str, web_server: Callable[..., WebServer], page: Any
) -> None:
    from playwright.sync_api import expect

    server = web_server("--read-only")
    failed = insert_job(db_url, status="failed", error="boom")
    page.goto(f"{server.url}/jobs/{failed}")
    expect(page.locator(".badge.read-only")).to_be_visible()
    expect(page.locator("button")).to_have_count(0)
    status = page.evaluate(
        "async url => (await fetch(url, {method: 'POST', body: new URLSearchParams({csrf: 'x'})})).status",
        f"/jobs/{failed}/retry",
    )
    assert status == 403
    assert status_of(db_url, failed) == "failed"

    page.goto(server.url + "/")
    expect(page.locator(".live")).to_have_text("live")
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=10)
    expect(page.locator(".live")).to_have_text("offline: no answer")  # not a quiet queue


def test_token_mode_refuses_the_browser_until_it_gives_the_token(
    db_url: str, web_server: Callable[..., WebServer], page: Any
) -> None:
    from playwright.sync_api import expect

    server = web_server(IMAGEN_WEB_TOKEN=TOKEN)
    pending = insert_job(db_url, "a job behind a token")
    answer = page.goto(server.url + "/")
    assert answer is not None and answer.status == 401
    expect(page.locator("body")).to_contain_text("needs its token")
    assert page.goto(server.url + "/static/htmx.min.js").status == 401

    page.goto(server.url + "/")
    page.fill("input[name=token]", "not-the-token-at-all")
    page.press("input[name=token]", "Enter")
    expect(page.locator("body")).to_contain_text("needs its token")

    page.fill("input[name=token]", TOKEN)
    page.press("input[name=token]", "Enter")
    expect(page.locator(f"#job-{pending}")).to_be_visible()
    assert "token" not in page.url
    page.goto(f"{server.url}/jobs/{pending}")
    page.click("button.cancel")
    expect(page.locator(".message")).to_have_text("pending -> cancelled")


def test_health_view_shows_the_listener_and_charts(
    db_url: str, pipeline: Any, web_server: Callable[..., WebServer], page: Any
) -> None:
    from playwright.sync_api import expect

    procs = pipeline()
    server = web_server()
    job_id = submit_as_owner(db_url, "a quick one", {"backend": "mock", "size": "64x64"})
    wait_until(lambda: status_of(db_url, job_id) == "done", timeout=30, message=procs.logs())
    page.goto(server.url + "/health")
    expect(page.locator("#listeners")).to_have_text("1")
    expect(page.locator("#queues tr[data-queue=imagen-generate]")).to_be_visible()
    expect(page.locator("svg.chart")).to_have_count(2)
    expect(page.locator("svg.chart rect title", has_text="done 1")).to_have_count(1)
