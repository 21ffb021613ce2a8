"""How fast `imagen web` answers on a large imagen.jobs: the figure in docs/operations.md.

Starts a throwaway PostgreSQL (or uses --database-url, where it creates and drops
its own database), applies the migrations, fills imagen.jobs with --rows jobs
spread over 30 days (mostly done, some failed and cancelled, a few pending and
running, 1,000 owners, an image row per 100 done jobs), runs VACUUM ANALYZE, then
serves the real app with uvicorn on loopback and times real HTTP requests for
each page (after a warm-up). With --compare it then drops migration 010's
indexes and times the same pages again.

    .venv/bin/python scripts/web_index_bench.py --rows 1000000 --compare

Never imported by imagen; nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagen import db
from imagen.config import load_settings
from imagen.devtools.servers import PostgresServer, free_port
from imagen.web import WebOptions, create_app

FILL = """
INSERT INTO imagen.jobs (owner_user_id, prompt, params, status, stage, attempt, error, created_at,
                         claimed_at, finished_at, stage_times)
SELECT owners[1 + (i %% 1000)],
       'bench job ' || i || CASE WHEN i %% 997 = 0 THEN ' a lighthouse at dusk' ELSE '' END,
       '{"backend": "mock", "size": "64x64"}',
       s.status,
       CASE WHEN s.status = 'running' THEN 'generating' END,
       CASE WHEN s.status = 'pending' THEN 0 ELSE 1 END,
       CASE WHEN s.status = 'failed' THEN 'generation failed: the mock backend was asked to fail' END,
       t.created,
       CASE WHEN s.status <> 'pending' THEN t.created + interval '5 ms' END,
       CASE WHEN s.status IN ('done', 'failed', 'cancelled') THEN t.created + interval '180 ms' END,
       '{}'
FROM generate_series(1, %(rows)s) AS i
CROSS JOIN LATERAL (SELECT now() - (%(rows)s - i) * (interval '30 days' / %(rows)s) AS created) t
CROSS JOIN LATERAL (
    SELECT CASE
        WHEN i > %(rows)s - 50 THEN 'running'
        WHEN i > %(rows)s - 250 THEN 'pending'
        WHEN i %% 100 = 7 THEN 'failed'
        WHEN i %% 200 = 11 THEN 'cancelled'
        ELSE 'done' END AS status
) s,
(SELECT array_agg(gen_random_uuid()) AS owners FROM generate_series(1, 1000)) o
"""

DROP_010 = "DROP INDEX imagen.jobs_created_idx, imagen.jobs_status_created_idx, imagen.jobs_finished_idx"


def fill(url: str, rows: int) -> None:
    started = time.monotonic()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(FILL, {"rows": rows})
        conn.execute("VACUUM ANALYZE imagen.jobs")
    print(f"filled imagen.jobs with {rows:,} rows in {time.monotonic() - started:.0f} s", flush=True)


def serve(url: str) -> tuple[str, object]:
    import uvicorn

    port = free_port()
    app = create_app(load_settings(database_url=url, redis_url="redis://127.0.0.1:1/0"), WebOptions())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(base + "/static/app.css", timeout=1)
            return base, server
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("the app did not start")


def time_pages(base: str, pages: list[str], repeat: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    with httpx.Client(base_url=base, timeout=60) as client:
        for path in pages:
            for _ in range(3):
                client.get(path).raise_for_status()
            samples = []
            for _ in range(repeat):
                started = time.perf_counter()
                client.get(path).raise_for_status()
                samples.append((time.perf_counter() - started) * 1000)
            times[path] = samples
    return times


def report(title: str, times: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    print(f"{'page':<32} {'median':>9} {'p95':>9} {'max':>9}")
    for path, samples in times.items():
        ordered = sorted(samples)
        p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
        shown = path if not path.startswith("/jobs/") else "/jobs/<id>"
        print(f"{shown:<32} {statistics.median(ordered):>7.1f}ms {p95:>7.1f}ms {ordered[-1]:>7.1f}ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30, help="timed requests per page")
    parser.add_argument(
        "--compare", action="store_true", help="then drop migration 010's indexes and time again"
    )
    parser.add_argument("--database-url", help="an admin connection to a server to create a database in")
    args = parser.parse_args()

    server = None
    admin = args.database_url
    if admin is None:
        server = PostgresServer()
        server.start()
        admin = server.url
    name = f"imagen_webbench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(admin)
    info["dbname"] = name
    url = psycopg.conninfo.make_conninfo(**info)
    try:
        db.migrate(url)
        fill(url, args.rows)
        with psycopg.connect(url) as conn:
            job = conn.execute("SELECT id FROM imagen.jobs WHERE status = 'failed' LIMIT 1").fetchone()
        assert job is not None
        base, _ = serve(url)
        pages = [
            "/",
            "/fragments/jobs",
            "/?status=failed",
            "/?status=done",
            "/?q=lighthouse",
            f"/jobs/{job[0]}",
            "/health",
        ]
        report(f"imagen web on {args.rows:,} jobs, with migration 010", time_pages(base, pages, args.repeat))
        if args.compare:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(DROP_010)
            report(
                "the same without migration 010's indexes", time_pages(base, pages, max(5, args.repeat // 3))
            )
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    main()
