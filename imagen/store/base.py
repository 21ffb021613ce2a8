"""The job store: every read and write of `imagen.jobs`, `imagen.images` and `imagen.usage`
that the listener and the stages make, behind one interface.

Two implementations keep the same rules: `PostgresJobStore` (the real one) and
`InMemoryJobStore` (for unit tests of the logic above it). One conformance suite
(tests/store/) runs against both. The rules every implementation must keep:

- every stage write is fenced on `status = 'running' AND attempt = <the message's
  attempt>`; a write whose fence fails changes nothing and answers False or None;
- a claim takes the pending jobs in rounds: every owner's next job before anyone's
  following one, oldest first within a round, and increments `attempt`. A new job
  goes one round after its owner's last pending job, or into the current (lowest
  pending) round; a job put back to pending keeps its round or takes the current
  one (sql/012_fair_rounds.sql);
- an images row is written once per job (a second write returns the first row's
  id), owned by the job's owner, and only while the attempt holds the job;
- a usage row is written once per call id, fence or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from imagen.storage import Storage
from imagen.store.rows import Claim, Discarded, ImageRow, Rescued, RunningJob
from imagen.usage import UsageRecord

if TYPE_CHECKING:
    from imagen.usage_spool import UsageSpool

JobId = UUID | str


class JobStore(Protocol):
    """The database seam of the listener, the stages and the operator commands."""

    # What a call raises when the database is away or refuses a statement (the stages note it and
    # retry; the heartbeat thread and the usage sink log it and go on). Empty for the in-memory store.
    errors: tuple[type[BaseException], ...]

    def submit_job(self, owner_user_id: UUID, prompt: str, params: Any) -> UUID:
        """Insert a pending job (as the service, not as its owner) and return its id."""
        ...

    def claim_jobs(self, limit: int, *, max_owners: int = 1000) -> list[Claim]:
        """Claim up to `limit` pending jobs fairly across owners, in claim order."""
        ...

    def count_running(self) -> int: ...

    def claim_within_cap(self, limit: int, max_in_flight: int) -> tuple[list[Claim], int | None]:
        """Claim up to min(limit, max_in_flight - running) in one step; also the running count
        before the claim, or None when nothing was claimed."""
        ...

    def release_claim(self, job_id: JobId, attempt: int) -> bool:
        """Undo a claim whose forward failed: back to pending, the attempt not counted."""
        ...

    def rescue_expired(self, *, lease_seconds: float, max_attempts: int, limit: int = 1000) -> list[Rescued]:
        """Running jobs whose heartbeat is older than the lease: back to pending, or failed at max attempts."""
        ...

    def begin_stage(self, job_id: JobId, attempt: int, stage: str) -> RunningJob | None:
        """Fence, mark the stage and refresh the heartbeat; None when the job is no longer ours."""
        ...

    def begin_sync(self, job_id: JobId, attempt: int) -> tuple[RunningJob | None, UUID | None]:
        """Start the sync stage (fenced); also the image id if an earlier run already recorded it."""
        ...

    def heartbeat_many(self, keys: list[tuple[str, int]]) -> int:
        """Refresh the heartbeat of (job_id, attempt) pairs; how many fences held."""
        ...

    def note_transient(self, job_id: JobId, attempt: int, error: str) -> bool: ...

    def fail_job(self, job_id: JobId, attempt: int, error: str) -> bool: ...

    def complete_job(self, job_id: JobId, attempt: int, image_id: JobId) -> bool: ...

    def record_job_image(
        self,
        attempt: int,
        image: ImageRow,
        *,
        complete_after: float | None = None,
        usage: UsageRecord | None = None,
    ) -> UUID | None:
        """Write the job's images row if `attempt` holds it (stage -> finalizing); None when fenced out.

        With `complete_after` the job also ends done with the row linked (the chained path),
        and with `usage` that usage row is written too, fence or not.
        """
        ...

    def record_usage(self, record: UsageRecord) -> None:
        """Write one usage row; a second write of the same call id leaves one row."""
        ...

    def job_state(self, job_id: JobId) -> tuple[str, int] | None:
        """(status, attempt), or None for a job that does not exist."""
        ...

    def get_job(self, job_id: JobId) -> dict[str, Any] | None:
        """The whole job row by column name."""
        ...

    def cancel_job(self, job_id: JobId) -> bool: ...

    def retry_job(self, job_id: JobId) -> bool: ...

    def discard_ended(self, job_id: JobId, storage: Storage) -> Discarded | None:
        """Remove a failed or cancelled job's images row and objects; None (nothing touched) otherwise."""
        ...

    def sweep_ended(self, storage: Storage, *, limit: int = 100) -> list[Discarded]:
        """Discard the image of up to `limit` jobs that ended failed or cancelled since their last sweep.

        A job whose storage call fails stays unswept and is tried again at the next sweep.
        """
        ...

    # ---- section: stages (beyond the fenced job writes above) ----

    def insert_image(self, image: ImageRow, owner_user_id: UUID | None) -> UUID:
        """An images row without a job (`imagen generate --sync`); a second insert for the same job
        returns the first row's id."""
        ...

    def replay_usage(self, spool: UsageSpool) -> int:
        """Write the spooled usage records (each once per call id); how many were written."""
        ...

    def still_running(self, keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which (job_id, attempt) pairs still hold their job: a read, no lock."""
        ...

    def owner_quota(self, owner_user_id: UUID) -> tuple[int | None, float | None] | None:
        """The owner's override row (daily images, daily cost), None without one."""
        ...

    def owner_quotas(self, limit: int) -> dict[UUID, tuple[int | None, float | None]]:
        """Up to `limit` override rows (daily images, daily cost) by owner, in no particular order."""
        ...

    def used_today(self, owner_user_id: UUID) -> tuple[int, float]:
        """Images of successful calls and the cost of every call of the owner since midnight UTC."""
        ...

    def recover(self, exc: BaseException) -> None:
        """A call failed with `exc`: prepare the next one (a pool tests its idle connections)."""
        ...

    def close(self) -> None: ...
