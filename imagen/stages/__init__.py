"""The stage bodies the actors call: generation, cloud sync, finalize, and the chained variant.

One file per concern: `context.py` (per-process resources), `lease.py` (the
heartbeat thread and when waits give up), `errors.py` (what an error does to the
job), `generate.py`, `sync.py`, `chained.py`, `finish.py` (the stage bodies) and
`images.py` (the images row, written in one place from one `ImageRow`).

Every stage starts with a fenced write; a message whose fence fails is dropped
with a log line, so redelivered or rescued work never overwrites newer state.
Permanent errors fail the job at once; transient ones are noted on the row and
re-raised for Dramatiq's Retries middleware, which owns backoff. The effects are
idempotent per job: one deterministic object path (upsert) and one images row,
however often a stage runs. The stages reach the database only through the job
store (imagen.store), so their logic runs on `InMemoryJobStore` in unit tests.
"""

from __future__ import annotations

from imagen.stages.context import LARGE_IMAGE, SYNC_TIME_LIMIT_S, StageContext
from imagen.stages.errors import LABELS as STAGE_LABELS
from imagen.stages.errors import guarded
from imagen.stages.finish import run_exhausted, run_finalize
from imagen.stages.generate import run_generate
from imagen.stages.sync import run_sync

__all__ = [
    "LARGE_IMAGE",
    "STAGE_LABELS",
    "SYNC_TIME_LIMIT_S",
    "StageContext",
    "guarded",
    "run_exhausted",
    "run_finalize",
    "run_generate",
    "run_sync",
]
