"""The database seam: a `JobStore` interface with typed rows, on PostgreSQL and in memory.

`PostgresJobStore` is what runs; `InMemoryJobStore` keeps the same fence,
claim and image rules without a server, for unit tests of the logic that uses a
store. tests/store/ is the conformance suite both must pass. Every statement on
`imagen.*` that the store runs is in `queries.sql`, loaded by name
(`imagen.store.queries`). The names below load on first use, so the modules
whose statements live in queries.sql can import it without a cycle.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imagen.store.base import JobId, JobStore
    from imagen.store.memory import InMemoryJobStore
    from imagen.store.postgres import PostgresJobStore
    from imagen.store.rows import Claim, Discarded, ImageMeta, ImageRow, Rescued, RunningJob

_WHERE = {
    "JobId": "base", "JobStore": "base", "InMemoryJobStore": "memory", "PostgresJobStore": "postgres",
    "Claim": "rows", "Discarded": "rows", "ImageMeta": "rows", "ImageRow": "rows", "Rescued": "rows", "RunningJob": "rows",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'imagen.store' has no attribute {name!r}")
    return getattr(import_module(f"imagen.store.{_WHERE[name]}"), name)


__all__ = [
    "Claim",
    "Discarded",
    "ImageMeta",
    "ImageRow",
    "InMemoryJobStore",
    "JobId",
    "JobStore",
    "PostgresJobStore",
    "Rescued",
    "RunningJob",
]
