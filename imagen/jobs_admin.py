"""Operator queries on imagen.jobs: submit, list, show, stats, retry, cancel, prune.

What `imagen jobs ...` and `imagen web` run, as functions over a job store
(`imagen.store`: PostgresJobStore, or InMemoryJobStore in the unit tests): the
rules and the arithmetic are here, the statements in imagen/store/operator.sql.
Retry and cancel are the store's `retry_job` / `cancel_job`, the statements the
stages' fences are written against, so their rules live in one place.
It must never change a pending or running row except to cancel it, and never
delete one: prune only takes terminal rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from imagen.store.operator import STATUSES, TERMINAL, JobNotFound, JobStateError
from imagen.store.operator import JobRefused as JobRefused
from imagen.store.rows import JobSummary

if TYPE_CHECKING:
    from imagen.store.operator import OperatorStore as Store

STAGES = ("queued", "generating", "syncing", "finalizing")
# Tie-break for events stamped in the same transaction (the claim stamps claimed_at and 'queued').
_EVENT_ORDER = {name: i for i, name in enumerate(("created", "pending", *STAGES, *TERMINAL))}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
PRUNE_BATCH = 5000
# What a refreshing view (`imagen jobs watch`, the dashboard) counts each status up to: counting a
# year of done jobs exactly would read every one of them on every refresh. Shown as "100,000+".
COUNT_CAP = 100_000


@dataclass(frozen=True)
class TimelineEvent:
    """A point in a job's last attempt: created, a stage start, or its end."""

    event: str
    at: datetime
    since_previous: float | None
    since_created: float


@dataclass(frozen=True)
class JobDetail:
    """Everything `imagen jobs show` prints: the row, its timeline, image and usage rows."""

    job: dict[str, Any]
    timeline: list[TimelineEvent]
    image: dict[str, Any] | None
    usage: list[dict[str, Any]]


@dataclass(frozen=True)
class JobStats:
    """`imagen jobs stats`: the queue now, and latencies of done jobs over a window (seconds)."""

    counts: dict[str, int]
    running_by_stage: dict[str, int]
    oldest_pending_seconds: float | None
    window_seconds: float
    finished_in_window: dict[str, int]
    pickup_p50: float | None
    pickup_p95: float | None
    total_p50: float | None
    total_p95: float | None
    provider_calls: int = 0
    cost_usd: float = 0.0
    unpriced_calls: int = 0
    unpriced_models: list[str] = field(default_factory=list)

    @property
    def queue_depth(self) -> int:
        return self.counts.get("pending", 0)


@dataclass(frozen=True)
class PruneResult:
    """What `prune` found (dry run) or deleted."""

    count: int
    dry_run: bool
    statuses: tuple[str, ...]
    older_than_seconds: float
    # Images rows kept but no longer linked to a job (their job was deleted); 0 on a dry run.
    images_detached: int = 0


def parse_duration(text: str) -> timedelta:
    """'45s', '30m', '2h', '7d', '1w' (a number and one unit) -> timedelta; ValueError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30m, 2h or 7d (units: s, m, h, d, w)")
    return timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """A duration back from `now` ('2h') or an ISO time ('2026-01-31T12:00', UTC when no zone is given)."""
    try:
        return (now or datetime.now(UTC)) - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration like 2h, 30m or 7d nor an ISO time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_statuses(values: Sequence[str], *, allowed: Sequence[str] = STATUSES) -> tuple[str, ...]:
    """Statuses given as repeated options and/or comma lists, validated and de-duplicated in order."""
    found: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in allowed:
                raise ValueError(f"{name!r} is not one of {', '.join(allowed)}")
            if name not in found:
                found.append(name)
    return tuple(found)


def list_jobs(
    store: Store,
    *,
    statuses: Sequence[str] = (),
    owner: UUID | None = None,
    since: datetime | None = None,
    text: str | None = None,
    limit: int = 50,
) -> list[JobSummary]:
    """Jobs newest first, filtered by status (any of), owner, creation time and text in the prompt."""
    return store.list_jobs(statuses=statuses, owner=owner, since=since, text=text, limit=limit)


def status_counts(store: Store) -> tuple[dict[str, int], dict[str, int]]:
    """(jobs per status with every status present, running jobs per stage in stage order)."""
    counts = dict.fromkeys(STATUSES, 0)
    by_stage: dict[str, int] = {}
    for status, stage, n in store.status_counts():
        counts[status] = counts.get(status, 0) + n
        if status == "running":
            key = stage or "none"
            by_stage[key] = by_stage.get(key, 0) + n
    return counts, in_stage_order(by_stage)


def capped_count(n: int, cap: int | None = COUNT_CAP) -> str:
    """A count as the refreshing views show it: '12,345', or '100,000+' at the cap (None: exact)."""
    return f"{n:,}+" if cap is not None and n >= cap else f"{n:,}"


def capped_status_counts(store: Store, cap: int) -> tuple[dict[str, int], dict[str, int]]:
    """(jobs per status, each stopped at `cap`; running jobs per stage in stage order, exact).

    For views that refresh: each count reads at most `cap` index entries and the per-stage
    split reads only the running jobs (jobs_running_idx), whatever the size of the table.
    """
    return store.capped_counts(cap), in_stage_order(store.running_by_stage())


def in_stage_order(by_stage: dict[str, int]) -> dict[str, int]:
    """Running jobs per stage, in the order a job goes through them ('none' last)."""
    return {s: by_stage[s] for s in (*STAGES, "none") if s in by_stage}


def job_stats(store: Store, window: timedelta) -> JobStats:
    """Counts by status, queue depth, oldest pending age, and p50/p95 pickup and total over `window`."""
    counts, by_stage = status_counts(store)
    seconds = window.total_seconds()
    finished = store.finished_window(seconds).whole
    spend = store.usage_cost(seconds)
    return JobStats(
        counts=counts,
        running_by_stage=by_stage,
        oldest_pending_seconds=store.oldest_pending_seconds(),
        window_seconds=seconds,
        finished_in_window={
            "done": finished.done,
            "failed": finished.failed,
            "cancelled": finished.cancelled,
        },
        pickup_p50=finished.pickup_p50,
        pickup_p95=finished.pickup_p95,
        total_p50=finished.total_p50,
        total_p95=finished.total_p95,
        provider_calls=spend.calls,
        cost_usd=spend.cost_usd,
        unpriced_calls=spend.unpriced_calls,
        unpriced_models=spend.unpriced_models,
    )


def timeline(job: dict[str, Any]) -> list[TimelineEvent]:
    """The last attempt's events from `created_at`, `stage_times` and `finished_at`, in time order.

    A claim resets `stage_times` and an operator retry empties it, so earlier
    attempts are not shown; a job a retry or rescue made pending again shows
    `pending` at `pending_at`, where its last attempt's wait began. A failed or
    cancelled job ends with its status at `finished_at`.
    """
    created: datetime = job["created_at"]
    points: dict[str, datetime] = {"created": created}
    if job.get("pending_at") is not None:
        points["pending"] = job[
            "pending_at"
        ]  # back to pending (a retry or a rescue): the last attempt's start
    for name, value in (job.get("stage_times") or {}).items():
        at = _as_datetime(value)
        if at is not None:
            points[str(name)] = at
    status = job.get("status")
    finished = job.get("finished_at")
    if status in TERMINAL and finished is not None and status not in points:
        points[str(status)] = finished
    ordered = sorted(points.items(), key=lambda item: (item[1], _EVENT_ORDER.get(item[0], 99)))
    events: list[TimelineEvent] = []
    previous: datetime | None = None
    for name, at in ordered:
        events.append(
            TimelineEvent(
                event=name,
                at=at,
                since_previous=(at - previous).total_seconds() if previous is not None else None,
                since_created=(at - created).total_seconds(),
            )
        )
        previous = at
    return events


def job_detail(store: Store, job_id: UUID) -> JobDetail:
    """The row, its timeline, its image row (if any) and its usage rows; JobNotFound when absent."""
    row = store.get_job(job_id)
    if row is None:
        raise JobNotFound(f"no job {job_id}")
    image = store.job_image(job_id, row.get("image_id"))
    return JobDetail(job=row, timeline=timeline(row), image=image, usage=store.job_usage(job_id))


def submit(store: Store, owner_user_id: UUID, prompt: str, params: dict[str, Any]) -> UUID:
    """Insert a pending job as its owner (RLS applies, as for the UI); JobRefused when refused."""
    from imagen.params import check_prompt

    check_prompt(prompt)
    return store.submit_as_owner(owner_user_id, prompt, params)


def _transition(store: Store, job_id: UUID, move: Callable[[UUID], bool], refusal: str) -> str:
    """Apply an operator transition; return the status the job had. JobNotFound / JobStateError otherwise."""
    state = store.job_state(job_id)
    if state is None:
        raise JobNotFound(f"no job {job_id}")
    if not move(job_id):
        now = store.job_state(job_id)
        status = now[0] if now else state[0]
        raise JobStateError(f"job {job_id} is {status}: {refusal}")
    return state[0]


def retry(store: Store, job_id: UUID) -> str:
    """failed or cancelled -> pending; return the status it had."""
    return _transition(store, job_id, store.retry_job, "only failed or cancelled jobs can be retried")


def cancel(store: Store, job_id: UUID) -> str:
    """pending or running -> cancelled; return the status it had."""
    return _transition(store, job_id, store.cancel_job, "only pending or running jobs can be cancelled")


def prune(
    store: Store, older_than: timedelta, statuses: Sequence[str] = TERMINAL, *, dry_run: bool = False
) -> PruneResult:
    """Delete terminal jobs that finished more than `older_than` ago (or count them, on a dry run).

    Deletes in batches, each its own transaction, so a large prune never holds
    many row locks for long. Images and usage rows stay, detached: their job_id
    is set to null by its foreign key, so no later job with the same id can
    ever be handed the image (issue 14). The result says how many images were
    detached.
    """
    chosen = tuple(s for s in statuses if s in TERMINAL)
    refused = [s for s in statuses if s not in TERMINAL]
    if refused or not chosen:
        raise JobStateError(
            f"prune deletes only done, failed or cancelled jobs, never {', '.join(refused) or 'nothing'}"
        )
    age = older_than.total_seconds()
    if dry_run:
        return PruneResult(store.count_prunable(chosen, age), True, chosen, age)
    deleted = detached = 0
    while True:
        n, images = store.prune_batch(chosen, age, PRUNE_BATCH)
        deleted += n
        detached += images
        if n < PRUNE_BATCH:
            break
    return PruneResult(deleted, False, chosen, age, detached)


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return None
