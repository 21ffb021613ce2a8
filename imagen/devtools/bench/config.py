"""The sizes of one benchmark run and its one error; nothing here starts a process or touches a server."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from imagen.devtools.bench.machine import filesystem_type
from imagen.errors import ImagenError

Echo = Callable[[str], None]
DRAMATIQ_THREADS = 8  # what `dramatiq` runs without -t
JOB_PARAMS = {"backend": "mock", "size": "64x64"}


class BenchError(ImagenError):
    """A phase could not run: a process died, a job failed, a deadline passed."""


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one run.

    Sequential samples are spaced by a random `gap_ms`; the stock-broker reference waits
    `idle_gap_ms` instead, long enough for Dramatiq's idle backoff to reach its cap, as on
    a quiet pipeline. A backlog that does not drain within `throughput_timeout` seconds is
    measured on what finished. The pipeline's images (its storage folder and local copies)
    go under `scratch`, `default_scratch()` when None.
    """

    jobs: int = 10_000
    samples: int = 200
    workers: tuple[int, ...] = (1, 2)
    stock_samples: int = 10
    threads: int = DRAMATIQ_THREADS
    owners: int = 10
    warmup: int = 32
    gap_ms: tuple[float, float] = (10.0, 30.0)
    idle_gap_ms: tuple[float, float] = (500.0, 1500.0)
    throughput_timeout: float = 45.0
    # Backlog rounds per width, each the bare chain then the pipeline: the machine is shared, and
    # one pair of backlogs a few seconds apart can see it at two different speeds.
    rounds: int = 3
    quick: bool = False
    scratch: Path | None = None
    # `--durable`: PostgreSQL with fsync, synchronous_commit and full_page_writes on, images on disk.
    durable: bool = False


# What `--durable` turns back on (imagen.devtools.servers runs PostgreSQL with fsync and
# full_page_writes off); synchronous_commit is on there too, named here so the run says so.
DURABLE_SETTINGS = {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}


def size_note(config: BenchConfig) -> str | None:
    """Why a smaller run's target lines are indicative only, or None for the full sizes."""
    full = BenchConfig()
    if config.jobs >= full.jobs and config.samples >= full.samples:
        return None
    return (
        f"backlog {config.jobs} and {config.samples} samples: the targets are set for a backlog of"
        f" {full.jobs} and {full.samples} samples, so this run's verdicts are indicative only"
        " (a small backlog drains before the pipeline's tables and queues fill up)"
    )


def default_scratch() -> Path:
    """/dev/shm when it is a writable tmpfs, else the system's temporary folder.

    The run's PostgreSQL has fsync off for the same reason: the figures are the pipeline's,
    not the disk's. On ext4 the file creations of 10,000 jobs (three files each) cost more
    the more files were deleted on it in the minutes before (the inode allocator skips
    recently freed inodes one by one; perf shows it), so on disk a run depends on what ran
    before it. `--scratch` puts the images on the disk to measure that too.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and filesystem_type(shm) == "tmpfs":
        return shm
    return Path(tempfile.gettempdir())


def bench_config(
    *,
    quick: bool = False,
    jobs: int | None = None,
    samples: int | None = None,
    workers: Sequence[int] = (),
    scratch: Path | None = None,
    rounds: int | None = None,
    durable: bool = False,
) -> BenchConfig:
    """The default run, or the ~1 minute `--quick` one, with explicit sizes winning."""
    base = BenchConfig()
    if quick:
        base = BenchConfig(
            jobs=1000, samples=50, stock_samples=5, warmup=16, throughput_timeout=20, rounds=1, quick=True
        )
    return replace(
        base,
        jobs=jobs or base.jobs,
        samples=samples or base.samples,
        stock_samples=min(base.stock_samples, samples or base.stock_samples),
        workers=tuple(sorted(set(workers))) or base.workers,
        # A durable run keeps its images on disk too, unless told where.
        scratch=scratch or (Path(tempfile.gettempdir()) if durable else None),
        rounds=rounds or base.rounds,
        durable=durable,
    )
