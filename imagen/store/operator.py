"""The operator's part of the job store: what `imagen jobs ...` and `imagen web` read and change.

`OperatorStore` is kept by both stores (`PostgresOperatorStore`, the
statements in operator.sql; `InMemoryOperatorStore`). Its methods only read,
except `submit_as_owner` (a new pending job, as its owner would insert it) and
`prune_batch` (deletes terminal jobs only); cancel and retry are `JobStore`'s.
The rules an operator sees (what may be retried, prune's wording, the stats'
arithmetic) live above it, in `imagen.jobs_admin`, where they have unit tests
on the in-memory store.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from imagen.errors import ImagenError
from imagen.store.rows import FinishedWindow, JobSummary, ListenerSession, OwnerDay, UsageCost

JobId = UUID | str
STATUSES = ("pending", "running", "done", "failed", "cancelled")
TERMINAL = ("done", "failed", "cancelled")


class JobNotFound(ImagenError):
    """No job has the id the operator gave."""


class JobStateError(ImagenError):
    """The job is not in a state the operation accepts (retry a done job, cancel a failed one)."""


class JobRefused(ImagenError):
    """The database refused a new job: a CHECK constraint, or row level security."""


class OperatorStore(Protocol):
    """Reads for the operator's views, the two writes only an operator makes, and `JobStore`'s
    look-ups and transitions the operator's commands use."""

    def get_job(self, job_id: JobId) -> dict[str, Any] | None: ...

    def job_state(self, job_id: JobId) -> tuple[str, int] | None: ...

    def cancel_job(self, job_id: JobId) -> bool: ...

    def retry_job(self, job_id: JobId) -> bool: ...

    def submit_as_owner(self, owner_user_id: UUID, prompt: str, params: dict[str, Any]) -> UUID:
        """Insert a pending job as its owner (row level security applies); JobRefused when refused."""
        ...

    def list_jobs(
        self,
        *,
        statuses: Sequence[str] = (),
        owner: UUID | None = None,
        since: datetime | None = None,
        text: str | None = None,
        limit: int = 50,
    ) -> list[JobSummary]:
        """Newest first; filtered by status (any of), owner, created since and text in the prompt."""
        ...

    def status_counts(self) -> list[tuple[str, str | None, int]]:
        """(status, stage, jobs) for every pair that has jobs."""
        ...

    def capped_counts(self, cap: int) -> dict[str, int]:
        """Jobs per status, each count stopped at `cap`."""
        ...

    def pending_count(self) -> int: ...

    def oldest_pending_seconds(self) -> float | None: ...

    def running_by_stage(self) -> dict[str, int]:
        """Running jobs per stage ('none' for a running job without one)."""
        ...

    def last_claim(self, window_seconds: float) -> datetime | None:
        """The latest claim of a running job or of one that finished inside the window."""
        ...

    def finished_window(self, window_seconds: float, *, by_minute: bool = False) -> FinishedWindow:
        """Jobs that finished in the last `window_seconds`, and per minute when `by_minute`."""
        ...

    def usage_cost(self, window_seconds: float) -> UsageCost:
        """Provider calls and their estimated cost over the window."""
        ...

    def owners_today(self, limit: int = 50) -> list[OwnerDay]:
        """Owners with usage since midnight UTC or a quota override, most spent first."""
        ...

    def job_image(self, job_id: JobId, image_id: JobId | None) -> dict[str, Any] | None:
        """The image row the job links (`image_id`), else the one written for the job."""
        ...

    def job_usage(self, job_id: JobId) -> list[dict[str, Any]]:
        """The job's usage rows, oldest first."""
        ...

    def image_row(self, image_id: JobId) -> dict[str, Any] | None: ...

    def count_prunable(self, statuses: Sequence[str], age_seconds: float) -> int:
        """Terminal jobs of these statuses that finished more than `age_seconds` ago."""
        ...

    def prune_batch(self, statuses: Sequence[str], age_seconds: float, batch: int) -> tuple[int, int]:
        """Delete up to `batch` of count_prunable's jobs in one transaction: (deleted, images detached).

        Their images rows stay, detached (job_id set to NULL by the foreign key); usage rows too (their foreign key sets job_id to NULL as well).
        """
        ...

    def listener_sessions(self) -> list[ListenerSession]:
        """The connected `imagen listen` sessions (none without a server to ask)."""
        ...
