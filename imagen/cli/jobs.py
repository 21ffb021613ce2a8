"""`imagen jobs ...`: operator commands on imagen.jobs (parse, call `imagen.jobs_admin`, print)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

import click

from imagen import jobs_admin
from imagen.cli import jobs_view as view
from imagen.cli.exits import handle_errors
from imagen.cli.options import check_prompt
from imagen.config import load_settings

if TYPE_CHECKING:
    from imagen.store import PostgresJobStore


class DurationType(click.ParamType):
    """A duration such as 30m, 2h or 7d."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return jobs_admin.parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class SinceType(click.ParamType):
    """A duration back from now (2h) or an ISO time."""

    name = "since"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return jobs_admin.parse_since(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _statuses(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...] | str | None
) -> tuple[str, ...]:
    allowed = jobs_admin.TERMINAL if param.name == "prune_statuses" else jobs_admin.STATUSES
    values = (value,) if isinstance(value, str) else (value or ())
    try:
        return jobs_admin.parse_statuses(values, allowed=allowed)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@contextmanager
def _store() -> Iterator[PostgresJobStore]:
    """The job store on one connection for the command (opened here, closed when it ends)."""
    from imagen.db import connect
    from imagen.store import PostgresJobStore

    settings = load_settings()
    with connect(settings.require_database_url(), autocommit=True) as conn:
        yield PostgresJobStore(lambda: nullcontext(conn))


@click.group()
def jobs() -> None:
    """Inspect and steer jobs in IMAGEN_DATABASE_URL."""


@jobs.command()
@click.argument("prompt", callback=check_prompt)
@click.option("--params", "params_json", default="{}", show_default=True, help="job params as a JSON object")
@click.option("--owner", type=click.UUID, help="owner user id  [default: IMAGEN_OWNER_USER_ID]")
@handle_errors
def submit(prompt: str, params_json: str, owner: UUID | None) -> None:
    """Insert a job as its owner, as the UI does.

    Runs as the `authenticated` role with PostgREST's JWT claims, so row level
    security applies; prints the new job's id.
    """
    try:
        params = json.loads(params_json)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--params") from None
    if not isinstance(params, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--params")
    owner_id = owner or load_settings().owner_user_id
    if owner_id is None:
        raise click.UsageError("no owner: give --owner UUID or set IMAGEN_OWNER_USER_ID")
    with _store() as store:
        job_id = jobs_admin.submit(store, owner_id, prompt, params)
    click.echo(str(job_id))


@jobs.command(name="ls")
@click.option(
    "--status",
    "statuses",
    multiple=True,
    callback=_statuses,
    help="only these statuses (repeat, or comma-separated: failed,cancelled)",
)
@click.option("--owner", type=click.UUID, help="only this owner's jobs")
@click.option("--since", type=SinceType(), help="created since: a duration back (2h, 30m, 7d) or an ISO time")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def list_command(
    statuses: tuple[str, ...], owner: UUID | None, since: datetime | None, limit: int, as_json: bool
) -> None:
    """List jobs, newest first."""
    with _store() as store:
        rows = jobs_admin.list_jobs(store, statuses=statuses, owner=owner, since=since, limit=limit)
    if as_json:
        view.echo_json([asdict(row) for row in rows])
    elif not rows:
        click.echo("no jobs match")
    else:
        click.echo("\n".join(view.table(rows)))


@jobs.command()
@click.argument("job_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def show(job_id: UUID, as_json: bool) -> None:
    """Show one job in full.

    Its row, the last attempt's stage timings (with the time between stages),
    error and last_error, its image row and its usage rows.
    """
    with _store() as store:
        detail = jobs_admin.job_detail(store, job_id)
    if as_json:
        view.echo_json(
            {
                "job": detail.job,
                "timeline": [asdict(event) for event in detail.timeline],
                "image": detail.image,
                "usage": detail.usage,
            }
        )
        return
    click.echo("\n".join(view.detail_lines(detail)))


@jobs.command()
@click.argument("job_id", type=click.UUID)
@handle_errors
def retry(job_id: UUID) -> None:
    """Put a failed or cancelled job back to pending.

    Its attempt count carries on: the next claim makes it attempt N+1.
    """
    with _store() as store:
        was = jobs_admin.retry(store, job_id)
    click.echo(f"job {job_id}: {was} -> pending")


@jobs.command()
@click.argument("job_id", type=click.UUID)
@handle_errors
def cancel(job_id: UUID) -> None:
    """Cancel a pending or running job.

    A running job stops at its next stage boundary.
    """
    with _store() as store:
        was = jobs_admin.cancel(store, job_id)
    note = " (it stops at its next stage boundary)" if was == "running" else ""
    click.echo(f"job {job_id}: {was} -> cancelled{note}")


@jobs.command()
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="seconds")
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=15, show_default=True, help="latest jobs shown"
)
@click.option("--once", is_flag=True, help="print one frame and exit")
@handle_errors
def watch(interval: float, limit: int, once: bool) -> None:
    """A live view of the queue, until Ctrl-C.

    Counts by status, running jobs by stage and the latest jobs, refreshed
    every --interval seconds. Each status is counted up to 100,000 (shown as
    "done 100,000+"), so a frame stays cheap on a table of millions of jobs;
    `imagen jobs stats` counts exactly.
    """
    cap = jobs_admin.COUNT_CAP  # read here, not bound at import: the tests make it small
    with _store() as store:
        try:
            while True:
                counts, by_stage = jobs_admin.capped_status_counts(store, cap)
                latest = jobs_admin.list_jobs(store, limit=limit)
                frame = [
                    f"imagen jobs  {view.when(datetime.now(UTC))}"
                    + ("" if once else f"  (every {interval:g}s, Ctrl-C to stop)"),
                    view.counts_line(counts, cap),
                ]
                if by_stage:
                    frame.append("running by stage: " + "  ".join(f"{k} {v}" for k, v in by_stage.items()))
                frame.append("")
                frame.extend(view.table(latest) if latest else ["no jobs yet"])
                if not once:
                    click.clear()
                click.echo("\n".join(frame))
                if once:
                    return
                time.sleep(interval)
        except KeyboardInterrupt:
            return


@jobs.command()
@click.option(
    "--window", type=DurationType(), default="1h", show_default=True, help="latency window (finished_at)"
)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def stats(window: timedelta, as_json: bool) -> None:
    """Queue depth, counts and latency percentiles.

    Counts by status, queue depth (pending), running jobs by stage, the oldest
    pending job's age, and p50/p95 pickup and total over a window.

    Pickup is pending -> claimed_at (the last claim), counted from created_at or,
    for a retried or rescued job, from when it became pending again (pending_at);
    total is created_at -> finished_at; both over done jobs that finished inside
    the window. Cost is the estimated provider spend of the usage rows written in
    the window; calls the price table cannot cost are counted and named, not
    silently left out.
    Then each owner's usage since 00:00 UTC (images made, estimated cost) against
    its daily quota (IMAGEN_OWNER_DAILY_IMAGES / _COST_USD or its imagen.owner_quotas row).
    """
    with _store() as store:
        result = jobs_admin.job_stats(store, window)
        owners = _owners_today(store)
    if as_json:
        data = asdict(result)
        data["queue_depth"] = result.queue_depth
        data["owners_today"] = [asdict(o) for o in owners]
        view.echo_json(data)
        return
    click.echo("\n".join(view.stats_lines(result) + view.quota_lines(owners)))


def _owners_today(store: PostgresJobStore) -> list[Any]:
    from imagen.quotas import Quota, owners_today

    settings = load_settings()
    return owners_today(store, Quota(settings.owner_daily_images, settings.owner_daily_cost_usd))


@jobs.command()
@click.option(
    "--older-than",
    type=DurationType(),
    required=True,
    help="older than this, counted from when the job finished: 30d, 12h",
)
@click.option(
    "--status",
    "prune_statuses",
    default="done,failed,cancelled",
    show_default=True,
    callback=_statuses,
    help="which terminal statuses (pending and running are never pruned)",
)
@click.option("--dry-run", is_flag=True, help="only count what would be deleted")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@handle_errors
def prune(older_than: timedelta, prune_statuses: tuple[str, ...], dry_run: bool, yes: bool) -> None:
    """Delete old done, failed or cancelled jobs.

    Deletes terminal jobs older than --older-than (counted from when each
    finished) and prints how many; pending and running jobs are never deleted.

    Image and usage rows stay, detached from the deleted job (their job_id
    becomes null); storage objects are untouched. The output says how many
    images were detached.
    """
    what = f"{'/'.join(prune_statuses)} job(s) older than {view.span(older_than.total_seconds())}"
    with _store() as store:
        if dry_run or not yes:
            found = jobs_admin.prune(store, older_than, prune_statuses, dry_run=True)
            if dry_run:
                click.echo(f"would delete {found.count} {what}")
                return
            if found.count == 0:
                click.echo(f"deleted 0 {what}")
                return
            click.confirm(f"delete {found.count} {what}?", abort=True)
        result = jobs_admin.prune(store, older_than, prune_statuses)
    click.echo(
        f"deleted {result.count} {what}; kept {result.images_detached} image row(s), detached from their jobs"
    )
