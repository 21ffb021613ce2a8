"""Every cost a store hands out is a float (None where there is none), on both stores.

PostgreSQL keeps costs as numeric(12, 6), which psycopg reads as Decimal; a caller
comparing, summing or printing figures as JSON must get the same type from either store.
"""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID, uuid4

from imagen.store import JobStore
from imagen.store.operator import OperatorStore
from imagen.usage import UsageRecord
from tests.store.conftest import Harness

OWNER = UUID("00000000-0000-4000-8000-0000000000ee")
QUIET = UUID("00000000-0000-4000-8000-0000000000f0")  # an override, no usage


def typed(value: Any) -> tuple[str, Any]:
    """The value with its type's name, so a Decimal 0.04 and a float 0.04 differ in the assertion."""
    return type(value).__name__, value


def call(job_id: UUID, cost: float | None) -> UsageRecord:
    return UsageRecord(
        backend="mock", model="mock-1", images=1, ok=True, latency_ms=5.0, cost_usd=cost,
        owner_user_id=OWNER, job_id=job_id, call_id=uuid4(),
    )  # fmt: skip


def test_every_cost_a_store_returns_is_a_float_or_none(store: JobStore, harness: Harness) -> None:
    ops = cast(OperatorStore, store)
    job_id = store.submit_job(OWNER, "a lighthouse", {})
    store.record_usage(call(job_id, 0.04))
    store.record_usage(call(job_id, None))  # unpriced
    harness.set_quota(OWNER, None, 2.5)
    harness.set_quota(QUIET, 3, None)

    # `imagen jobs show` and the dashboard's job page
    assert sorted(typed(u["cost_usd"]) for u in ops.job_usage(job_id)) == [
        ("NoneType", None),
        ("float", 0.04),
    ]
    # `imagen jobs stats`
    assert typed(ops.usage_cost(3600).cost_usd) == ("float", 0.04)
    # `imagen jobs stats`' owners today
    days = {d.owner_user_id: (typed(d.cost_usd), typed(d.daily_cost_usd)) for d in ops.owners_today()}
    assert days == {
        OWNER: (("float", 0.04), ("float", 2.5)),
        QUIET: (("float", 0.0), ("NoneType", None)),
    }
    # the quota checks before a provider call
    assert [typed(store.used_today(owner)[1]) for owner in (OWNER, QUIET)] == [
        ("float", 0.04),
        ("float", 0.0),
    ]
    assert [typed(cast(Any, store.owner_quota(owner))[1]) for owner in (OWNER, QUIET)] == [
        ("float", 2.5),
        ("NoneType", None),
    ]
    assert {owner: typed(cost) for owner, (_, cost) in store.owner_quotas(10).items()} == {
        OWNER: ("float", 2.5),
        QUIET: ("NoneType", None),
    }
