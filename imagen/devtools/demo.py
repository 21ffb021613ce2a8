"""`imagen demo`: the whole pipeline on this machine, with no configuration.

Starts throwaway PostgreSQL and Redis servers from the binaries on PATH, and
always cleans up what it started. It never writes to a configured database or
Redis (IMAGEN_DATABASE_URL, IMAGEN_REDIS_URL in the environment or a .env)
unless asked with --use-env: a .env in the folder is someone's real pipeline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from imagen import jobs
from imagen.config import Settings, load_settings
from imagen.db import connect, migrate
from imagen.devtools.runner import PipelineProcesses, Proc, listeners_listening, pipeline_env
from imagen.devtools.servers import PostgresServer, RedisServer
from imagen.errors import NotReachable
from imagen.smoke import TERMINAL
from imagen.store.queries import QUERIES

PROMPTS = [
    ("a lighthouse at dusk", {"backend": "mock", "size": "512x512"}),
    ("a red fox in fresh snow", {"backend": "mock", "aspect_ratio": "16:9", "preset": "cinematic"}),
    ("a bowl of ramen, top view", {"backend": "mock", "size": "384x384", "seed": 7}),
    ("an old map of an imaginary island", {"backend": "mock", "preset": "watercolor"}),
]
BAD = ("this job has a typo in its params", {"backend": "mock", "sise": "512x512"})


def run_demo(
    workdir: Path, *, count: int, timeout: float, echo: Callable[[str], None], use_env: bool = False
) -> bool:
    """Run the demo; True when every good job ended done and the bad one failed with a reason.

    `count` jobs in all: with two or more, the last is the deliberately bad one.
    """
    settings = load_settings()
    workdir = workdir.resolve()
    with ExitStack() as stack:
        if use_env:
            database_url, redis_url = _configured_servers(settings, echo)
        else:
            # Configured means set in the environment or .env, not a default: pydantic-settings knows which.
            left = " (IMAGEN_DATABASE_URL is set: left alone; --use-env uses it)"
            pg = PostgresServer()
            pg.start()
            stack.callback(pg.cleanup)
            database_url = pg.url
            configured = "database_url" in settings.model_fields_set
            echo(f"postgres: started a throwaway server on port {pg.port}{left if configured else ''}")
            rs = RedisServer()
            rs.start()
            stack.callback(rs.cleanup)
            redis_url = rs.url
            left = " (IMAGEN_REDIS_URL is set: left alone; --use-env uses it)"
            configured = "redis_url" in settings.model_fields_set
            echo(f"redis:    started a throwaway server on port {rs.port}{left if configured else ''}")
        migrate(database_url, echo=lambda line: echo(f"migrate:  {line}"))
        # The mock's test options (delay_ms, fail) are on, so a demo can show a slow or failing job.
        env = pipeline_env(database_url, redis_url, workdir, IMAGEN_JOB_TEST_OPTIONS="true")
        procs = PipelineProcesses(env, workdir / "logs")
        stack.callback(procs.stop)
        workers = procs.start_workers(processes=1, threads=4)
        procs.start_listener()
        # Insert only once both are up, so the table shows pickup latency, not start-up time.
        if not _wait_ready(procs, workers, database_url, timeout):
            echo("the pipeline processes did not start:\n" + procs.logs())
            return False
        echo(f"started:  imagen listen + dramatiq imagen.actors (logs in {workdir / 'logs'})")
        return _submit_and_watch(database_url, workdir, count, timeout, echo, procs)
    return False  # pragma: no cover


def _configured_servers(settings: Settings, echo: Callable[[str], None]) -> tuple[str, str]:
    """--use-env: the configured servers, each checked first, so one that does not answer is named
    in one line instead of showing jobs stuck pending."""
    import psycopg
    import redis

    database_url = settings.require_database_url()
    try:
        with connect(database_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        from imagen.db import describe_error

        problem = describe_error(exc)
        if isinstance(problem, NotReachable):
            detail = str(problem).removeprefix("database error: ")
            raise NotReachable(f"postgres at IMAGEN_DATABASE_URL does not answer: {detail}") from None
        raise problem from None
    echo("postgres: using IMAGEN_DATABASE_URL (--use-env)")
    source = "IMAGEN_REDIS_URL" if "redis_url" in settings.model_fields_set else "the default Redis URL"
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise NotReachable(f"redis at {source} does not answer: {exc}") from None
    finally:
        client.close()
    echo(f"redis:    using {source} (--use-env)")
    return database_url, settings.redis_url


def _wait_ready(procs: PipelineProcesses, workers: Proc, database_url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while workers.ready_count() < 1 or listeners_listening(database_url) < 1:
        if time.monotonic() > deadline or not all(p.alive() for p in procs.procs):
            return False
        time.sleep(0.05)
    return True


def _submit_and_watch(
    database_url: str,
    workdir: Path,
    count: int,
    timeout: float,
    echo: Callable[[str], None],
    procs: PipelineProcesses,
) -> bool:
    owner = uuid.uuid4()
    good = count - 1 if count > 1 else count
    wanted = [PROMPTS[i % len(PROMPTS)] for i in range(good)]
    with connect(database_url, autocommit=True) as conn:
        ids = [jobs.submit_job(conn, owner, prompt, params) for prompt, params in wanted]
        bad_id = jobs.submit_job(conn, owner, *BAD) if count > 1 else None
        echo(
            f"inserted: {count} job(s) into imagen.jobs as owner {owner} (role authenticated)"
            + ("; the last has a typo in its params, to show the failure path" if bad_id else "")
        )
        every = [*ids, *([bad_id] if bad_id else [])]
        deadline = time.monotonic() + timeout
        rows: dict[Any, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            rows = {i: jobs.get_job(conn, i) or {} for i in every}
            if all(r.get("status") in TERMINAL for r in rows.values()):
                break
            if not all(p.alive() for p in procs.procs):
                echo("a pipeline process exited early:\n" + procs.logs())
                return False
            time.sleep(0.05)
        images = {r[0]: r[1:] for r in conn.execute(QUERIES["images_of_jobs"], {"job_ids": every}).fetchall()}
    echo("")
    echo(f"{'job':<36}  {'status':<7} {'pickup':>8} {'total':>8}  image / error")
    ok = True
    for job_id in every:
        row = rows[job_id]
        created, claimed, finished = row.get("created_at"), row.get("claimed_at"), row.get("finished_at")
        pickup = f"{(claimed - created).total_seconds() * 1000:.0f}ms" if claimed and created else "-"
        total = f"{(finished - created).total_seconds() * 1000:.0f}ms" if finished and created else "-"
        if row.get("status") == "done" and row.get("image_id") in images:
            bucket, path = images[row["image_id"]]
            detail = str(workdir / "storage" / bucket / path)
        else:
            detail = row.get("error") or "(no error text)"
        echo(f"{job_id!s:<36}  {row.get('status', '?'):<7} {pickup:>8} {total:>8}  {detail}")
        expected = "failed" if job_id == bad_id else "done"
        ok = ok and row.get("status") == expected
    echo("")
    echo(
        "every job reached its end: done with an image, or failed with a reason"
        if ok
        else "some jobs did not end as expected"
    )
    return ok
