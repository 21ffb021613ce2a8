"""`imagen listen`, `imagen smoke`, `imagen demo`: running and proving the pipeline."""

from __future__ import annotations

from uuid import UUID

import click

from imagen.cli.exits import EXIT_FAILED, fail, handle_errors
from imagen.cli.options import check_prompt, round_times
from imagen.config import load_settings


@click.command()
@click.option("--database-url", envvar="IMAGEN_DATABASE_URL", help="overrides IMAGEN_DATABASE_URL")
@handle_errors
def listen(database_url: str | None) -> None:
    """Run the listener: LISTEN on imagen_jobs, claim pending jobs, forward them to the actors.

    Wakes on NOTIFY or every IMAGEN_POLL_INTERVAL seconds (the safety poll),
    drains the backlog in fair batches, and rescues jobs whose lease
    (IMAGEN_LEASE_SECONDS) expired. Several listeners may run at once.
    SIGTERM stops claiming, finishes the forward in hand and exits 0.
    Metrics on IMAGEN_METRICS_ADDR:IMAGEN_LISTENER_METRICS_PORT (0 disables).

    Exits 78 without retrying when the configuration cannot work (an unknown
    database or role, a wrong password, a schema that needs `imagen db
    migrate`); a server that is down is retried with backoff.
    """
    from imagen.listener import run_listener
    from imagen.logs import configure_logging

    settings = load_settings(**({"database_url": database_url} if database_url else {}))
    settings.require_database_url()
    configure_logging(settings.log_format, settings.log_level)
    run_listener(settings)


@click.command()
@click.option(
    "--prompt", default="imagen smoke test: a lighthouse at dusk", show_default=True, callback=check_prompt
)
@click.option(
    "--params",
    "params_json",
    default='{"backend": "mock", "size": "256x256"}',
    show_default=True,
    help="job params as JSON",
)
@click.option(
    "--owner", type=click.UUID, help="owner user id  [default: IMAGEN_OWNER_USER_ID or a random one]"
)
@click.option("--timeout", type=float, default=60.0, show_default=True, help="seconds to wait for done")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def smoke(prompt: str, params_json: str, owner: UUID | None, timeout: float, as_json: bool) -> None:
    """The SQL INSERT smoke: insert one job the way the UI does and wait for it.

    Inserts as the `authenticated` role with PostgREST's JWT claims, so RLS is
    exercised; needs a running listener and actors. Prints pickup latency
    (INSERT -> claimed), total time (INSERT -> done) and where the image went
    (bucket and path; the file for local storage); exits 1 unless done. A job
    that has not ended after --timeout is cancelled, so nothing runs it later.
    """
    import json

    from imagen.smoke import run_smoke

    settings = load_settings()
    try:
        params = json.loads(params_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from None
    result = run_smoke(settings, prompt=prompt, params=params, owner=owner, timeout=timeout)
    if as_json:
        click.echo(json.dumps(round_times(result.as_dict()), indent=2))
    else:
        click.echo(result.describe())
    if result.timed_out:
        fail(
            f"job {result.job_id} was still {result.status} after {timeout:g} s ({result.hint()});"
            " the smoke cancelled it",
            EXIT_FAILED,
        )
    if result.status != "done":
        fail(f"job {result.job_id} ended {result.status}: {result.error or 'no error text'}", EXIT_FAILED)


@click.command()
@click.option(
    "--jobs",
    "count",
    type=click.IntRange(1, 100),
    default=4,
    show_default=True,
    help="jobs to insert in all; with 2 or more, the last has bad params (the failure path)",
)
@click.option(
    "--use-env",
    is_flag=True,
    help="run on IMAGEN_DATABASE_URL and IMAGEN_REDIS_URL (migrating the database) instead of throwaway servers",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default="imagen-demo",
    show_default=True,
    help="where images and logs go",
)
@click.option("--timeout", type=float, default=120.0, show_default=True)
@handle_errors
def demo(count: int, workdir: str, timeout: float, use_env: bool) -> None:
    """The whole pipeline on this machine with no configuration.

    Starts throwaway PostgreSQL and Redis servers from the binaries on PATH,
    even when IMAGEN_DATABASE_URL / IMAGEN_REDIS_URL are set (in the
    environment or a .env here): those are used, and the database migrated,
    only with --use-env. Applies the migrations, starts a listener and Dramatiq
    workers, inserts jobs through SQL as the UI does (the last with bad params,
    to show the failure path) and shows each reach its end with its image path.
    """
    from pathlib import Path

    from imagen.devtools.demo import run_demo

    ok = run_demo(Path(workdir), count=count, timeout=timeout, echo=click.echo, use_env=use_env)
    if not ok:
        fail("the demo did not finish as expected (see above)")
