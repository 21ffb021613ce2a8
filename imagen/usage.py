"""Usage sinks: one record per provider call, failed and blocked calls included.

A record is what the provider reported plus our cost estimate, attributed to an
owner and (for pipeline runs) a job, under the call's id. Every database write
of it is idempotent on that id (`imagen.usage.call_id` is UNIQUE), so it may be
written again whenever it is unclear whether a write landed. Sinks never raise
into the pipeline for a bookkeeping problem they can recover from: losing an
image because a ledger write failed would be the wrong trade; a record the
database did not take goes to the local spool (`imagen.usage_spool`) instead.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID, uuid4

from imagen.backends.base import Usage

if TYPE_CHECKING:
    from imagen.store.base import JobStore
    from imagen.usage_spool import UsageSpool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageRecord:
    """A provider call as the ledger stores it."""

    backend: str
    model: str
    images: int
    ok: bool
    latency_ms: float
    cost_usd: float | None = None
    # How cost_usd was estimated, or "unpriced: <why>" when it is None (imagen.prices.price_usage).
    cost_basis: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    image_output_tokens: int | None = None
    thought_tokens: int | None = None
    error: str | None = None
    owner_user_id: UUID | None = None
    job_id: UUID | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    raw: dict[str, Any] = field(default_factory=dict)
    # The provider call's id (imagen.usage.call_id, UNIQUE): what makes every write of the row idempotent.
    call_id: UUID = field(default_factory=uuid4)

    @classmethod
    def from_usage(
        cls,
        usage: Usage,
        *,
        cost_usd: float | None,
        owner_user_id: UUID | None = None,
        job_id: UUID | None = None,
        call_id: UUID | None = None,
        cost_basis: str | None = None,
    ) -> UsageRecord:
        return cls(
            call_id=call_id or uuid4(),
            backend=usage.backend,
            model=usage.model,
            images=usage.images,
            ok=usage.ok,
            latency_ms=round(usage.latency_ms, 3),
            cost_usd=cost_usd,
            cost_basis=cost_basis,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            image_output_tokens=usage.image_output_tokens,
            thought_tokens=usage.thought_tokens,
            error=usage.error,
            owner_user_id=owner_user_id,
            job_id=job_id,
            raw=dict(usage.raw),
        )

    def to_json(self) -> dict[str, Any]:
        # Not asdict(): it deep-copies `raw` (the provider's usage block) on every call.
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["raw"] = dict(self.raw)
        data["created_at"] = self.created_at.isoformat()
        data["owner_user_id"] = str(self.owner_user_id) if self.owner_user_id else None
        data["job_id"] = str(self.job_id) if self.job_id else None
        data["call_id"] = str(self.call_id)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageRecord:
        """The record `to_json` wrote (the spool's files); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("owner_user_id", "job_id", "call_id"):
            if values.get(key):
                values[key] = UUID(str(values[key]))
        values["created_at"] = datetime.fromisoformat(values["created_at"])
        return cls(**values)


class UsageSink(Protocol):
    """Where usage records go."""

    def record(self, record: UsageRecord) -> None: ...


class JsonlSink:
    """Appends one JSON object per line; safe across threads of one process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, record: UsageRecord) -> None:
        line = json.dumps(record.to_json(), sort_keys=True, default=str)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock, open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        except OSError as exc:
            log.warning("usage: could not append to %s: %s", self.path, exc)


class DatabaseSink:
    """Writes rows into imagen.usage through the job store (one short statement each).

    A record the database did not take (connection lost, server down) goes to `spool`, which
    keeps it on disk until a replay writes it; without a spool it is logged and lost.
    """

    def __init__(self, store: JobStore, *, spool: UsageSpool | None = None) -> None:
        # The actors share their pooled store; the CLI's opens a short-lived connection per record.
        self.store = store
        self.spool = spool

    @classmethod
    def from_url(cls, conninfo: str, *, spool: UsageSpool | None = None) -> DatabaseSink:
        from imagen.store.postgres import PostgresJobStore

        return cls(PostgresJobStore.from_url(conninfo), spool=spool)

    def record(self, record: UsageRecord) -> None:
        try:
            self.store.record_usage(record)
        except self.store.errors as exc:
            if self.spool is not None and self.spool.put(record):
                log.warning(
                    "usage: could not insert into imagen.usage (%s); spooled call %s", exc, record.call_id
                )
            else:
                log.error(
                    "usage: could not insert into imagen.usage: %s; call %s not recorded", exc, record.call_id
                )


class HeldSink:
    """Keeps records for the caller to write with its next statement, or to pass on with `release`.

    The chained stage writes a successful call's row in the statement that ends the job (one
    commit fewer per job); every other way out of the stage releases it to the real sink at once.
    """

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record(self, record: UsageRecord) -> None:
        self.records.append(record)

    def sole(self) -> UsageRecord | None:
        """The one record held (a provider call's), or None; it stays held until `written`."""
        return self.records[0] if len(self.records) == 1 else None

    def written(self) -> None:
        """The caller's statement wrote what is held."""
        self.records.clear()

    def release(self, sink: UsageSink) -> None:
        records, self.records = self.records, []
        for record in records:
            sink.record(record)


class MultiSink:
    """Fans one record out to several sinks."""

    def __init__(self, *sinks: UsageSink) -> None:
        self.sinks = sinks

    def record(self, record: UsageRecord) -> None:
        for sink in self.sinks:
            sink.record(record)
