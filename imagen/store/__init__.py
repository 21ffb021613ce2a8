"""The database seam: a `JobStore` interface with typed rows, on PostgreSQL and in memory.

`PostgresJobStore` is what runs; `InMemoryJobStore` keeps the same fence,
claim and image rules without a server, for unit tests of the logic that uses a
store. tests/store/ is the conformance suite both must pass.
"""

from imagen.store.base import JobId, JobStore
from imagen.store.memory import InMemoryJobStore
from imagen.store.postgres import PostgresJobStore
from imagen.store.rows import Claim, Discarded, ImageRow, Rescued, RunningJob

__all__ = [
    "Claim",
    "Discarded",
    "ImageRow",
    "InMemoryJobStore",
    "JobId",
    "JobStore",
    "PostgresJobStore",
    "Rescued",
    "RunningJob",
]
