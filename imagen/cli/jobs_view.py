"""How `imagen jobs ...` prints: tables, durations, one job in full, the stats (no database here)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import click

from imagen import jobs_admin
from imagen.cli.options import round_times

PROMPT_WIDTH = 40


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def echo_json(data: Any) -> None:
    click.echo(json.dumps(round_times(jsonable(data)), indent=2))


def when(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def span(seconds: float) -> str:
    """A duration the operator gave, in the form they give it (30d, 12h, 45s), not as a timing."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def duration(seconds: float | None) -> str:
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


def short(text: str | None, width: int) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def table(rows: list[jobs_admin.JobSummary]) -> list[str]:
    lines = [f"{'ID':<36}  {'STATUS':<9}  {'STAGE':<10}  {'ATT':>3}  {'CREATED (UTC)':<19}  OWNER     PROMPT"]
    for job in rows:
        created = job.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"{job.id!s:<36}  {job.status:<9}  {job.stage or '-':<10}  {job.attempt:>3}  {created:<19}  "
            f"{str(job.owner_user_id)[:8]}  {short(job.prompt, PROMPT_WIDTH)}"
        )
    return lines


def counts_line(counts: dict[str, int], cap: int | None = None) -> str:
    """'pending 5  running 1  done 100,000+ ...': a count at `cap` is shown as 'cap+' (capped counts)."""
    return "  ".join(
        f"{status} {jobs_admin.capped_count(counts.get(status, 0), cap)}" for status in jobs_admin.STATUSES
    )


def detail_lines(detail: jobs_admin.JobDetail) -> list[str]:
    """`imagen jobs show`: the row, the last attempt's timeline, the image row and the usage rows."""
    job = detail.job
    fields = [
        ("job", str(job["id"])),
        ("status", f"{job['status']} (attempt {job['attempt']})"),
        ("stage", job["stage"] or "-"),
        ("owner", str(job["owner_user_id"])),
        ("prompt", job["prompt"]),
        ("params", json.dumps(job["params"], sort_keys=True)),
        ("created", when(job["created_at"])),
        *(
            [("pending", f"{when(job['pending_at'])}  (pending again: retried or rescued)")]
            if job.get("pending_at")
            else []
        ),
        ("claimed", when(job["claimed_at"])),
        ("heartbeat", when(job["heartbeat_at"])),
        ("finished", when(job["finished_at"])),
        ("updated", when(job["updated_at"])),
    ]
    if job.get("error"):
        fields.append(("error", job["error"]))
    if job.get("last_error"):
        fields.append(("last_error", job["last_error"]))
    lines = [f"{name:<11} {value}" for name, value in fields]
    lines.append("timeline    (last attempt; +time since the previous event)")
    for event in detail.timeline:
        step = f"+{duration(event.since_previous)}" if event.since_previous is not None else ""
        lines.append(f"  {event.event:<11} {when(event.at)}  {step:<12} at {duration(event.since_created)}")
    image = detail.image
    if image:
        lines.append(
            f"image       {image['id']} {image['bucket']}/{image['path']} "
            f"({image['mime']}, {image['width']}x{image['height']}, {image['bytes']} bytes)"
        )
    else:
        lines.append("image       -")
    if detail.usage:
        lines.append("usage")
        for use in detail.usage:
            cost = (
                f"${use['cost_usd']:.4f}"
                if use["cost_usd"] is not None
                else (
                    "cost unpriced" if str(use.get("cost_basis") or "").startswith("unpriced") else "cost -"
                )
            )
            outcome = "ok" if use["ok"] else f"failed: {short(use['error'], 60)}"
            lines.append(
                f"  {when(use['created_at'])}  {use['backend']}/{use['model']}  images {use['images']}  "
                f"{duration(use['latency_ms'] / 1000)}  {cost}  {outcome}"
            )
    else:
        lines.append("usage       -")
    return lines


def stats_lines(result: jobs_admin.JobStats) -> list[str]:
    """`imagen jobs stats`: the queue now, and the window's counts, latencies and cost."""
    counts = result.counts
    stages = ", ".join(f"{k} {v}" for k, v in result.running_by_stage.items())
    window_counts = ", ".join(f"{k} {v}" for k, v in result.finished_in_window.items())
    lines = [
        f"pending     {counts['pending']}  (queue depth; oldest {duration(result.oldest_pending_seconds)})",
        f"running     {counts['running']}" + (f"  ({stages})" if stages else ""),
        f"done        {counts['done']}",
        f"failed      {counts['failed']}",
        f"cancelled   {counts['cancelled']}",
        f"window      {duration(result.window_seconds)}: finished {window_counts}",
        f"pickup      p50 {duration(result.pickup_p50)}  p95 {duration(result.pickup_p95)}"
        "  (pending -> claimed, done jobs in the window)",
        f"total       p50 {duration(result.total_p50)}  p95 {duration(result.total_p95)}"
        "  (created -> finished, done jobs in the window)",
        f"cost        ${result.cost_usd:.4f} est. over {result.provider_calls} provider call(s) in the window"
        + (
            f"; {result.unpriced_calls} call(s) UNPRICED, not counted "
            f"({', '.join(result.unpriced_models)}: see usage.cost_basis)"
            if result.unpriced_calls
            else ""
        ),
    ]
    return lines


def quota_lines(owners: list[Any]) -> list[str]:
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
