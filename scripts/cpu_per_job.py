"""Where a job's CPU goes: the pipeline drains a backlog, and each process group's CPU is divided by the jobs.

Starts fresh throwaway PostgreSQL and Redis servers for every backlog, `dramatiq imagen.actors -p N`
and `imagen listen` as `imagen bench` does (images on /dev/shm when it is a tmpfs), warms them up,
inserts --jobs jobs in one statement and, while they drain, reads the CPU time of the worker
processes, the listener, PostgreSQL's processes and Redis from /proc, and the whole machine's from
/proc/stat. Prints one line per backlog, then each checkout's medians.

With --checkout DIR (repeatable) the pipeline runs from another checkout of imagen instead (its
package on PYTHONPATH, its sql/ migrated), the checkouts interleaved round by round: how the figures
of two commits compare on one noisy machine. CPU per job is steadier than a rate there, but the same
code still reads 0.95-1.3 ms a job in the workers from one backlog to the next on a shared VM:
compare medians of several rounds (docs/benchmarks.md, "After the store seam").

    .venv/bin/python scripts/cpu_per_job.py --rounds 3
    .venv/bin/python scripts/cpu_per_job.py --rounds 3 --checkout . --checkout /path/to/old

Never imported by imagen; nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagen.devtools.bench.config import DRAMATIQ_THREADS, JOB_PARAMS
from imagen.devtools.bench.procs import CpuWatch, descendants
from imagen.devtools.bench.sql import QUERIES
from imagen.devtools.runner import PipelineProcesses, listeners_listening, pipeline_env
from imagen.devtools.servers import migrated_servers

GROUPS = ("workers", "listener", "postgres", "redis", "machine")


def drain(conn: psycopg.Connection, jobs: int) -> float:
    """Insert a backlog of `jobs` from 10 owners; the seconds until none is pending or running."""
    owners = [uuid.uuid4() for _ in range(10)]
    conn.execute(QUERIES["backlog_insert"], (owners, len(owners), Jsonb(JOB_PARAMS), jobs))
    started = time.monotonic()
    while True:
        row = conn.execute(QUERIES["backlog_busy"], {"owners": owners}).fetchone()
        if row is not None and not row[0]:
            return time.monotonic() - started
        if time.monotonic() - started > 120:
            raise SystemExit("the backlog did not drain in 120 s")
        time.sleep(0.02)


def one_backlog(checkout: Path, jobs: int, workers: int) -> dict[str, float]:
    """One fresh pipeline from `checkout`: CPU per job (ms) by group, and the rate."""
    with contextlib.ExitStack() as stack:
        root, pg, rd = migrated_servers(stack, "cpu-per-job-", sql_dir=checkout / "sql")
        shm = Path("/dev/shm")
        files = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
        stack.callback(shutil.rmtree, files, ignore_errors=True)
        env = pipeline_env(pg.url, rd.url, files, IMAGEN_JOB_TEST_OPTIONS="true")
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        procs = PipelineProcesses(env, root / "logs")
        stack.callback(procs.stop)
        worker = procs.start_workers(processes=workers, threads=DRAMATIQ_THREADS)
        deadline = time.monotonic() + 60
        while worker.ready_count() < workers:
            if time.monotonic() > deadline or not worker.alive():
                raise SystemExit(f"workers did not start:\n{worker.tail()}")
            time.sleep(0.05)
        listener = procs.start_listener()
        while listeners_listening(pg.url) == 0:
            if time.monotonic() > deadline or not listener.alive():
                raise SystemExit(f"the listener did not start:\n{listener.tail()}")
            time.sleep(0.05)
        assert pg.proc is not None and rd.proc is not None
        postmaster, redis_pid = pg.proc.pid, rd.proc.pid
        groups = {
            "workers": lambda: descendants(worker.popen.pid),
            "listener": lambda: descendants(listener.popen.pid),
            "postgres": lambda: descendants(postmaster),
            "redis": lambda: [redis_pid],
        }
        with psycopg.connect(pg.url, autocommit=True) as conn:
            drain(conn, 300)  # warm-up: imports, pools, prepared statements
            with CpuWatch(groups) as cpu:
                seconds = drain(conn, jobs)
        return {"rate": jobs / seconds, **{name: cpu.used[name] * 1000 / jobs for name in GROUPS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000, help="backlog size (default 5000)")
    parser.add_argument("--rounds", type=int, default=3, help="backlogs per checkout (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--checkout", type=Path, action="append", help="an imagen checkout (default: this one)"
    )
    args = parser.parse_args()
    checkouts = [c.resolve() for c in args.checkout or [Path(__file__).resolve().parents[1]]]
    results: dict[Path, list[dict[str, float]]] = {c: [] for c in checkouts}
    print(f"{args.jobs}-job backlogs, -p {args.workers}; CPU ms per job by process group")
    for i in range(args.rounds):
        for checkout in checkouts:
            figures = one_backlog(checkout, args.jobs, args.workers)
            results[checkout].append(figures)
            print(
                f"round {i + 1} {checkout.name}: {figures['rate']:.0f} jobs/s  "
                + "  ".join(f"{name} {figures[name]:.3f}" for name in GROUPS),
                flush=True,
            )
    print("medians (lowest-highest):")
    for checkout, rows in results.items():
        cells = []
        for name in ("rate", *GROUPS):
            values = [row[name] for row in rows]
            digits = 0 if name == "rate" else 3
            low, mid, high = min(values), statistics.median(values), max(values)
            cells.append(f"{name} {mid:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})")
        print(f"  {checkout}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
