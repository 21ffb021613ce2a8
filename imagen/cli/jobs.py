"""`imagen jobs ...`: operator commands on imagen.jobs (parse, call `imagen.jobs_admin`, print)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from uuid import UUID

import click

from imagen import jobs_admin
from imagen.cli.exits import handle_errors
from imagen.cli.options import check_prompt, round_times
from imagen.config import load_settings

if TYPE_CHECKING:
    from imagen.jobs import Conn

PROMPT_WIDTH = 40


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
def _connection() -> Iterator[Conn]:
    from imagen.db import connect

    settings = load_settings()
    with connect(settings.require_database_url(), autocommit=True) as conn:
        yield conn


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(round_times(_jsonable(data)), indent=2))


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _span(seconds: float) -> str:
    """A duration the operator gave, in the form they give it (30d, 12h, 45s), not as a timing."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h" if hours else f"{days}d"


def _short(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _table(rows: list[jobs_admin.JobSummary]) -> list[str]:
    lines = [f"{'ID':<36}  {'STATUS':<9}  {'STAGE':<10}  {'ATT':>3}  {'CREATED (UTC)':<19}  OWNER     PROMPT"]
    for job in rows:
        created = job.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{job.id!s:<36}  {job.status:<9}  {job.stage or '-':<10}  {job.attempt:>3}  {created:<19}  "
            f"{str(job.owner_user_id)[:8]}  {_short(job.prompt, PROMPT_WIDTH)}"
        )
    return lines


def _counts_line(counts: dict[str, int]) -> str:
    return "  ".join(f"{status} {counts.get(status, 0)}" for status in jobs_admin.STATUSES)


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
    with _connection() as conn:
        job_id = jobs_admin.submit(conn, owner_id, prompt, params)
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
    with _connection() as conn:
        rows = jobs_admin.list_jobs(conn, statuses=statuses, owner=owner, since=since, limit=limit)
    if as_json:
        _echo_json([asdict(row) for row in rows])
    elif not rows:
        click.echo("no jobs match")
    else:
        click.echo("\n".join(_table(rows)))


@jobs.command()
@click.argument("job_id", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@handle_errors
def show(job_id: UUID, as_json: bool) -> None:
    """Show one job in full.

    Its row, the last attempt's stage timings (with the time between stages),
    error and last_error, its image row and its usage rows.
    """
    with _connection() as conn:
        detail = jobs_admin.job_detail(conn, job_id)
    if as_json:
        _echo_json(
            {
                "job": detail.job,
                "timeline": [asdict(event) for event in detail.timeline],
                "image": detail.image,
                "usage": detail.usage,
            }
        )
        return
    job = detail.job
    fields = [
        ("job", str(job["id"])),
        ("status", f"{job['status']} (attempt {job['attempt']})"),
        ("stage", job["stage"] or "-"),
        ("owner", str(job["owner_user_id"])),
        ("prompt", job["prompt"]),
        ("params", json.dumps(job["params"], sort_keys=True)),
        ("created", _when(job["created_at"])),
        *(
            [("pending", f"{_when(job['pending_at'])}  (pending again: retried or rescued)")]
            if job.get("pending_at")
            else []
        ),
        ("claimed", _when(job["claimed_at"])),
        ("heartbeat", _when(job["heartbeat_at"])),
        ("finished", _when(job["finished_at"])),
        ("updated", _when(job["updated_at"])),
    ]
    if job.get("error"):
        fields.append(("error", job["error"]))
    if job.get("last_error"):
        fields.append(("last_error", job["last_error"]))
    for name, value in fields:
        click.echo(f"{name:<11} {value}")
    click.echo("timeline    (last attempt; +time since the previous event)")
    for event in detail.timeline:
        step = f"+{_duration(event.since_previous)}" if event.since_previous is not None else ""
        click.echo(f"  {event.event:<11} {_when(event.at)}  {step:<12} at {_duration(event.since_created)}")
    image = detail.image
    if image:
        click.echo(
            f"image       {image['id']} {image['bucket']}/{image['path']} "
            f"({image['mime']}, {image['width']}x{image['height']}, {image['bytes']} bytes)"
        )
    else:
        click.echo("image       -")
    if detail.usage:
        click.echo("usage")
        for use in detail.usage:
            cost = (
                f"${float(use['cost_usd']):.4f}"
                if use["cost_usd"] is not None
                else (
                    "cost unpriced" if str(use.get("cost_basis") or "").startswith("unpriced") else "cost -"
                )
            )
            outcome = "ok" if use["ok"] else f"failed: {_short(use['error'], 60)}"
            click.echo(
                f"  {_when(use['created_at'])}  {use['backend']}/{use['model']}  images {use['images']}  "
                f"{_duration(use['latency_ms'] / 1000)}  {cost}  {outcome}"
            )
    else:
        click.echo("usage       -")


@jobs.command()
@click.argument("job_id", type=click.UUID)
@handle_errors
def retry(job_id: UUID) -> None:
    """Put a failed or cancelled job back to pending.

    Its attempt count carries on: the next claim makes it attempt N+1.
    """
    with _connection() as conn:
        was = jobs_admin.retry(conn, job_id)
    click.echo(f"job {job_id}: {was} -> pending")


@jobs.command()
@click.argument("job_id", type=click.UUID)
@handle_errors
def cancel(job_id: UUID) -> None:
    """Cancel a pending or running job.

    A running job stops at its next stage boundary.
    """
    with _connection() as conn:
        was = jobs_admin.cancel(conn, job_id)
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
    every --interval seconds.
    """
    with _connection() as conn:
        try:
            while True:
                counts, by_stage = jobs_admin.status_counts(conn)
                latest = jobs_admin.list_jobs(conn, limit=limit)
                frame = [
                    f"imagen jobs  {_when(datetime.now(UTC))}"
                    + ("" if once else f"  (every {interval:g}s, Ctrl-C to stop)"),
                    _counts_line(counts),
                ]
                if by_stage:
                    frame.append("running by stage: " + "  ".join(f"{k} {v}" for k, v in by_stage.items()))
                frame.append("")
                frame.extend(_table(latest) if latest else ["no jobs yet"])
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
    with _connection() as conn:
        result = jobs_admin.job_stats(conn, window)
        owners = _owners_today(conn)
    if as_json:
        data = asdict(result)
        data["queue_depth"] = result.queue_depth
        data["owners_today"] = [asdict(o) for o in owners]
        _echo_json(data)
        return
    counts = result.counts
    stages = ", ".join(f"{k} {v}" for k, v in result.running_by_stage.items())
    window_counts = ", ".join(f"{k} {v}" for k, v in result.finished_in_window.items())
    lines = [
        f"pending     {counts['pending']}  (queue depth; oldest {_duration(result.oldest_pending_seconds)})",
        f"running     {counts['running']}" + (f"  ({stages})" if stages else ""),
        f"done        {counts['done']}",
        f"failed      {counts['failed']}",
        f"cancelled   {counts['cancelled']}",
        f"window      {_duration(result.window_seconds)}: finished {window_counts}",
        f"pickup      p50 {_duration(result.pickup_p50)}  p95 {_duration(result.pickup_p95)}"
        "  (pending -> claimed, done jobs in the window)",
        f"total       p50 {_duration(result.total_p50)}  p95 {_duration(result.total_p95)}"
        "  (created -> finished, done jobs in the window)",
        f"cost        ${result.cost_usd:.4f} est. over {result.provider_calls} provider call(s) in the window"
        + (
            f"; {result.unpriced_calls} call(s) UNPRICED, not counted "
            f"({', '.join(result.unpriced_models)}: see usage.cost_basis)"
            if result.unpriced_calls
            else ""
        ),
    ]
    click.echo("\n".join(lines + _quota_lines(owners)))


def _owners_today(conn: Conn) -> list[Any]:
    from imagen.quotas import Quota, owners_today

    settings = load_settings()
    return owners_today(conn, Quota(settings.owner_daily_images, settings.owner_daily_cost_usd))


def _quota_lines(owners: list[Any]) -> list[str]:
    """Usage since 00:00 UTC against the daily quota, per owner (most spent first)."""
    if not owners:
        return ["usage today (since 00:00 UTC): none"]
    lines = ["usage today (since 00:00 UTC), per owner: images / quota, cost / quota"]
    for o in owners:
        images = f"{o.images} / {o.quota.daily_images if o.quota.daily_images is not None else '-'}"
        cap = o.quota.daily_cost_usd
        cost = f"${o.cost_usd:.2f} / {f'${cap:.2f}' if cap is not None else '-'}"
        lines.append(
            f"  {o.owner_user_id}  {images:>12}  {cost:>18}" + ("  (override)" if o.overridden else "")
        )
    return lines


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
    what = f"{'/'.join(prune_statuses)} job(s) older than {_span(older_than.total_seconds())}"
    with _connection() as conn:
        if dry_run or not yes:
            found = jobs_admin.prune(conn, older_than, prune_statuses, dry_run=True)
            if dry_run:
                click.echo(f"would delete {found.count} {what}")
                return
            if found.count == 0:
                click.echo(f"deleted 0 {what}")
                return
            click.confirm(f"delete {found.count} {what}?", abort=True)
        result = jobs_admin.prune(conn, older_than, prune_statuses)
    click.echo(
        f"deleted {result.count} {what}; kept {result.images_detached} image row(s), detached from their jobs"
    )
