"""The live Supabase test's guard: it must never claim or process another owner's jobs.

A live run points at a real project, often a shared one. Starting our own
listener and workers there (as the test once did) claims every pending job of
every owner. So the test submits one job the way the UI does and lets the
deployed pipeline take it; it starts its own processes only when no listener is
deployed and nothing of anyone else's is pending or running.
"""

from __future__ import annotations

import psycopg

from imagen.devtools.runner import listeners_listening


class LiveRunRefused(Exception):
    """Running here could touch other owners' jobs."""


def choose_pipeline(database_url: str) -> str:
    """'deployed' when a listener already holds its LISTEN on this database; 'own' when none does
    and no job is pending or running (so our own processes have nothing of anyone else's to
    claim); otherwise LiveRunRefused saying why.

    Seeing another role's listener in pg_stat_activity needs pg_read_all_stats (or the same
    role); Supabase's `postgres` sees the sessions of the role the workers connect as.
    """
    if listeners_listening(database_url) > 0:
        return "deployed"
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM imagen.jobs WHERE status IN ('pending', 'running')"
        ).fetchone()
    busy = int(row[0]) if row else 0
    if busy:
        raise LiveRunRefused(
            f"no imagen listener is running on this database and {busy} job(s) are pending or running:"
            " a listener started by this test would claim and process them, whoever owns them."
            " Deploy the pipeline (imagen listen + dramatiq imagen.actors) or run it when the queue is empty"
        )
    return "own"
