"""The dashboard's own reads: capped counts, image rows, and the health view's figures.

Listing, showing, retrying and cancelling jobs go through `imagen.jobs_admin`
(what `imagen jobs` runs); this module holds only what the dashboard needs on
top, each query shaped to stay cheap on a table of millions of rows (the
indexes are in sql/010_dashboard_indexes.sql). It only reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from imagen import jobs_admin

if TYPE_CHECKING:
    from imagen.jobs import Conn

# Counting a million done jobs exactly would scan a million index entries on every refresh;
# beyond this the page says "100,000+" (Oban Web and River UI cap their counts the same way).
COUNT_CAP = 100_000

# One capped count per status, each with its status as a literal so the planner picks that
# status's best path (the partial pending/running indexes, or jobs_status_created_idx) from its
# statistics; a parameter would get one generic plan, a sequential scan on a small table.
CAPPED_COUNTS = "\nUNION ALL\n".join(
    f"SELECT '{status}', (SELECT count(*) FROM (SELECT 1 FROM imagen.jobs WHERE status = '{status}'"
    " LIMIT %(cap)s) c)"
    for status in jobs_admin.STATUSES
)

IMAGE_ROW = """
SELECT id, job_id, owner_user_id, bucket, path, mime, width, height, bytes
FROM imagen.images WHERE id = %(image_id)s
"""

# Each `imagen listen` holds one dedicated connection for its LISTEN; it is found by its last
# statement (the LISTEN, or the self-check that replaces it every 10 s, imagen.listener), never by
# application_name, which Supavisor's session mode replaces. Another role's sessions are hidden
# unless this role has pg_read_all_stats.
LISTENERS = """
SELECT pid, host(client_addr), backend_start, state_change
FROM pg_stat_activity
WHERE datname = current_database() AND state = 'idle' AND query IN (%(listen)s, %(health)s)
ORDER BY backend_start
"""

# The running jobs through the partial jobs_running_idx; finished ones through jobs_finished_idx.
LAST_CLAIM = """
SELECT greatest(
    (SELECT max(claimed_at) FROM imagen.jobs WHERE status = 'running'),
    (SELECT max(claimed_at) FROM imagen.jobs WHERE finished_at >= now() - make_interval(secs => %(window)s))
)
"""

RUNNING_BY_STAGE = """
SELECT coalesce(stage, 'none'), count(*) FROM imagen.jobs WHERE status = 'running' GROUP BY 1
"""

# Per-minute buckets of jobs that finished in the window: what the health charts draw.
PER_MINUTE = """
SELECT date_bin('1 minute', finished_at, %(start)s) AS minute,
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
WHERE finished_at >= %(start)s
GROUP BY 1
ORDER BY 1
"""


@dataclass(frozen=True)
class Listener:
    """One `imagen listen` session seen in pg_stat_activity."""

    pid: int
    client: str | None
    connected_at: datetime
    state_since: datetime | None


@dataclass(frozen=True)
class MinuteBucket:
    """Jobs that finished in one minute, and their latencies (seconds)."""

    minute: datetime
    done: int
    failed: int
    cancelled: int
    pickup_p50: float | None
    pickup_p95: float | None
    total_p50: float | None
    total_p95: float | None


@dataclass(frozen=True)
class Health:
    """The health view: listeners, the queue in the database, and the last window."""

    listeners: list[Listener]
    last_claim: datetime | None
    pending: int
    oldest_pending_seconds: float | None
    running_by_stage: dict[str, int]
    window_seconds: float
    finished: dict[str, int]
    pickup_p50: float | None
    pickup_p95: float | None
    total_p50: float | None
    total_p95: float | None
    start: datetime | None = None
    minutes: list[MinuteBucket] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return sum(self.running_by_stage.values())

    @property
    def listeners_connected(self) -> int:
        return len(self.listeners)


def capped_counts(conn: Conn, cap: int = COUNT_CAP) -> dict[str, int]:
    """Jobs per status, each count stopped at `cap` (show `cap` as "cap+")."""
    rows = conn.execute(CAPPED_COUNTS, {"cap": cap}).fetchall()
    found = {status: int(n) for status, n in rows}
    return {status: found.get(status, 0) for status in jobs_admin.STATUSES}


def image_row(conn: Conn, image_id: UUID) -> dict[str, Any] | None:
    from psycopg.rows import dict_row

    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(IMAGE_ROW, {"image_id": image_id}).fetchone()


def health(conn: Conn, window_seconds: float = 3600.0) -> Health:
    """Everything the health view shows that lives in PostgreSQL (Redis is `imagen.web.redis_queues`)."""
    from imagen.listener import HEALTH_SQL, LISTEN_SQL

    found = conn.execute(LISTENERS, {"listen": LISTEN_SQL, "health": HEALTH_SQL}).fetchall()
    listeners = [Listener(*row) for row in found]
    last = conn.execute(LAST_CLAIM, {"window": window_seconds}).fetchone()
    oldest = conn.execute(jobs_admin.OLDEST_PENDING).fetchone()
    pending = conn.execute("SELECT count(*) FROM imagen.jobs WHERE status = 'pending'").fetchone()
    by_stage = {stage: int(n) for stage, n in conn.execute(RUNNING_BY_STAGE).fetchall()}
    ordered = {s: by_stage[s] for s in (*jobs_admin.STAGES, "none") if s in by_stage}
    window = conn.execute(jobs_admin.WINDOW, {"window": window_seconds}).fetchone()
    assert window is not None
    start_row = conn.execute(
        "SELECT date_trunc('minute', now()) - make_interval(secs => %(window)s) + interval '1 minute'",
        {"window": window_seconds},
    ).fetchone()
    assert start_row is not None
    minutes = [MinuteBucket(*row) for row in conn.execute(PER_MINUTE, {"start": start_row[0]}).fetchall()]
    return Health(
        listeners=listeners,
        last_claim=last[0] if last else None,
        pending=int(pending[0]) if pending else 0,
        oldest_pending_seconds=oldest[0] if oldest else None,
        running_by_stage=ordered,
        window_seconds=window_seconds,
        finished={"done": window[0], "failed": window[1], "cancelled": window[2]},
        pickup_p50=window[3],
        pickup_p95=window[4],
        total_p50=window[5],
        total_p95=window[6],
        start=start_row[0],
        minutes=minutes,
    )
