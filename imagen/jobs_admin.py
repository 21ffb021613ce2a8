"""Operator queries on imagen.jobs: submit, list, show, stats, retry, cancel, prune.

What `imagen jobs ...` runs, as importable functions over one connection. The
stage path (claim, fence, heartbeat, complete, rescue) stays in `imagen.jobs`;
this module only reads the table, or changes it the way an operator asks
(retry and cancel go through `imagen.jobs`, so their rules live in one place).
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

from imagen.errors import ImagenError

if TYPE_CHECKING:
    from imagen.jobs import Conn

# psycopg and imagen.jobs are imported inside the functions that need them: the CLI imports
# this module on every `imagen` invocation, and only `imagen jobs` talks to the database.

STATUSES = ("pending", "running", "done", "failed", "cancelled")
TERMINAL = ("done", "failed", "cancelled")
STAGES = ("queued", "generating", "syncing", "finalizing")
# Tie-break for events stamped in the same transaction (the claim stamps claimed_at and 'queued').
_EVENT_ORDER = {name: i for i, name in enumerate(("created", "pending", *STAGES, *TERMINAL))}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
PRUNE_BATCH = 5000

LIST = """
SELECT id, owner_user_id, status, stage, attempt, prompt, error, image_id,
       created_at, claimed_at, finished_at
FROM imagen.jobs
WHERE (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND (%(owner)s::uuid IS NULL OR owner_user_id = %(owner)s::uuid)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
  AND (%(pattern)s::text IS NULL OR prompt ILIKE %(pattern)s::text)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s
"""

COUNTS = """
SELECT status, stage, count(*) FROM imagen.jobs GROUP BY status, stage
"""

OLDEST_PENDING = """
SELECT extract(epoch FROM now() - min(created_at))::float8 FROM imagen.jobs WHERE status = 'pending'
"""

# Done jobs that finished inside the window: pickup is pending -> (last) claim, counted from the INSERT
# or from when a retry or rescue last made the job pending again; total is INSERT -> finished.
WINDOW = """
SELECT
    count(*) FILTER (WHERE status = 'done'),
    count(*) FILTER (WHERE status = 'failed'),
    count(*) FILTER (WHERE status = 'cancelled'),
    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM claimed_at - coalesce(pending_at, created_at))::float8)
        FILTER (WHERE status = 'done' AND claimed_at IS NOT NULL),
    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM claimed_at - coalesce(pending_at, created_at))::float8)
        FILTER (WHERE status = 'done' AND claimed_at IS NOT NULL),
    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)::float8)
        FILTER (WHERE status = 'done'),
    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)::float8)
        FILTER (WHERE status = 'done')
FROM imagen.jobs
WHERE finished_at >= now() - make_interval(secs => %(window)s)
"""

# Provider spend over the window; a null cost_usd is a call the price table could not cost.
USAGE_COST = """
SELECT count(*), coalesce(sum(cost_usd), 0)::float8, count(*) FILTER (WHERE cost_usd IS NULL),
    coalesce(array_agg(DISTINCT backend || '/' || model) FILTER (WHERE cost_usd IS NULL), '{}')
FROM imagen.usage
WHERE created_at >= now() - make_interval(secs => %(window)s)
"""

IMAGE = """
SELECT id, bucket, path, mime, width, height, bytes, backend, model, created_at
FROM imagen.images
WHERE job_id = %(job_id)s OR id = %(image_id)s::uuid
ORDER BY (id = %(image_id)s::uuid) DESC NULLS LAST
LIMIT 1
"""

USAGE = """
SELECT backend, model, images, input_tokens, output_tokens, cost_usd, cost_basis, latency_ms, ok, error,
    created_at
FROM imagen.usage
WHERE job_id = %(job_id)s
ORDER BY created_at, id
"""

# A terminal job's age is counted from when it finished (created_at for rows that never recorded it).
_PRUNABLE = """
FROM imagen.jobs
WHERE status = ANY(%(statuses)s::text[]) AND status IN ('done', 'failed', 'cancelled')
  AND coalesce(finished_at, created_at) < now() - make_interval(secs => %(age)s)
"""

COUNT_PRUNABLE = "SELECT count(*) " + _PRUNABLE

# The images rows of the deleted jobs are detached by their foreign key (job_id set to null,
# sql/006_job_ownership.sql); the count reads the statement's snapshot, taken before that.
PRUNE = (
    "WITH gone AS (DELETE FROM imagen.jobs WHERE id IN (SELECT id "
    + _PRUNABLE
    + " LIMIT %(batch)s FOR UPDATE SKIP LOCKED) RETURNING id)"
    " SELECT (SELECT count(*) FROM gone),"
    " (SELECT count(*) FROM imagen.images WHERE job_id IN (SELECT id FROM gone))"
)


class JobNotFound(ImagenError):
    """No job has the id the operator gave."""


class JobStateError(ImagenError):
    """The job is not in a state the operation accepts (retry a done job, cancel a failed one)."""


class JobRefused(ImagenError):
    """The database refused a new job: a CHECK constraint, or row level security."""


@dataclass(frozen=True)
class JobSummary:
    """One line of `imagen jobs ls`."""

    id: UUID
    owner_user_id: UUID
    status: str
    stage: str | None
    attempt: int
    prompt: str
    error: str | None
    image_id: UUID | None
    created_at: datetime
    claimed_at: datetime | None
    finished_at: datetime | None


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
    conn: Conn,
    *,
    statuses: Sequence[str] = (),
    owner: UUID | None = None,
    since: datetime | None = None,
    text: str | None = None,
    limit: int = 50,
) -> list[JobSummary]:
    """Jobs newest first, filtered by status (any of), owner, creation time and text in the prompt."""
    pattern = "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%" if text else None
    rows = conn.execute(
        LIST,
        {
            "statuses": list(statuses) or None,
            "owner": owner,
            "since": since,
            "pattern": pattern,
            "limit": limit,
        },
    ).fetchall()
    return [JobSummary(*row) for row in rows]


def status_counts(conn: Conn) -> tuple[dict[str, int], dict[str, int]]:
    """(jobs per status with every status present, running jobs per stage)."""
    counts = dict.fromkeys(STATUSES, 0)
    by_stage: dict[str, int] = {}
    for status, stage, n in conn.execute(COUNTS).fetchall():
        counts[status] = counts.get(status, 0) + n
        if status == "running":
            key = stage or "none"
            by_stage[key] = by_stage.get(key, 0) + n
    ordered = {s: by_stage[s] for s in (*STAGES, "none") if s in by_stage}
    return counts, ordered


def job_stats(conn: Conn, window: timedelta) -> JobStats:
    """Counts by status, queue depth, oldest pending age, and p50/p95 pickup and total over `window`."""
    counts, by_stage = status_counts(conn)
    oldest = conn.execute(OLDEST_PENDING).fetchone()
    seconds = window.total_seconds()
    row = conn.execute(WINDOW, {"window": seconds}).fetchone()
    assert row is not None
    spend = conn.execute(USAGE_COST, {"window": seconds}).fetchone()
    assert spend is not None
    return JobStats(
        counts=counts,
        running_by_stage=by_stage,
        oldest_pending_seconds=oldest[0] if oldest else None,
        window_seconds=seconds,
        finished_in_window={"done": row[0], "failed": row[1], "cancelled": row[2]},
        pickup_p50=row[3],
        pickup_p95=row[4],
        total_p50=row[5],
        total_p95=row[6],
        provider_calls=spend[0],
        cost_usd=spend[1],
        unpriced_calls=spend[2],
        unpriced_models=sorted(spend[3]),
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


def job_detail(conn: Conn, job_id: UUID) -> JobDetail:
    """The row, its timeline, its image row (if any) and its usage rows; JobNotFound when absent."""
    from psycopg.rows import dict_row

    from imagen import jobs

    row = jobs.get_job(conn, job_id)
    if row is None:
        raise JobNotFound(f"no job {job_id}")
    with conn.cursor(row_factory=dict_row) as cur:
        image = cur.execute(IMAGE, {"job_id": job_id, "image_id": row.get("image_id")}).fetchone()
        usage = cur.execute(USAGE, {"job_id": job_id}).fetchall()
    return JobDetail(job=row, timeline=timeline(row), image=image, usage=list(usage))


def submit(conn: Conn, owner_user_id: UUID, prompt: str, params: dict[str, Any]) -> UUID:
    """Insert a pending job as its owner (RLS applies, as for the UI); JobRefused when refused."""
    import psycopg

    from imagen import jobs
    from imagen.params import check_prompt

    check_prompt(prompt)
    try:
        return jobs.submit_job(conn, owner_user_id, prompt, params)
    except (psycopg.errors.CheckViolation, psycopg.errors.InsufficientPrivilege) as exc:
        text = exc.diag.message_primary or str(exc).strip().splitlines()[0]
        raise JobRefused(f"the database refused the job: {text}") from None


def _transition(conn: Conn, job_id: UUID, move: Callable[[Conn, UUID], bool], refusal: str) -> str:
    """Apply an operator transition; return the status the job had. JobNotFound / JobStateError otherwise."""
    from imagen import jobs

    state = jobs.job_state(conn, job_id)
    if state is None:
        raise JobNotFound(f"no job {job_id}")
    if not move(conn, job_id):
        now = jobs.job_state(conn, job_id)
        status = now[0] if now else state[0]
        raise JobStateError(f"job {job_id} is {status}: {refusal}")
    return state[0]


def retry(conn: Conn, job_id: UUID) -> str:
    """failed or cancelled -> pending; return the status it had."""
    from imagen import jobs

    return _transition(conn, job_id, jobs.retry_job, "only failed or cancelled jobs can be retried")


def cancel(conn: Conn, job_id: UUID) -> str:
    """pending or running -> cancelled; return the status it had."""
    from imagen import jobs

    return _transition(conn, job_id, jobs.cancel_job, "only pending or running jobs can be cancelled")


def prune(
    conn: Conn, older_than: timedelta, statuses: Sequence[str] = TERMINAL, *, dry_run: bool = False
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
    params = {"statuses": list(chosen), "age": older_than.total_seconds(), "batch": PRUNE_BATCH}
    if dry_run:
        row = conn.execute(COUNT_PRUNABLE, params).fetchone()
        return PruneResult(int(row[0]) if row else 0, True, chosen, older_than.total_seconds())
    deleted = detached = 0
    while True:
        with conn.transaction():
            row = conn.execute(PRUNE, params).fetchone()
        n, images = (int(row[0]), int(row[1])) if row else (0, 0)
        deleted += n
        detached += images
        if n < PRUNE_BATCH:
            break
    return PruneResult(deleted, False, chosen, older_than.total_seconds(), detached)


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
