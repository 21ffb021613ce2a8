"""A worker process's memory under the largest images jobs may ask for: `python -m imagen.devtools.bench.memory`.

Starts throwaway PostgreSQL and Redis, `imagen listen` and `dramatiq imagen.actors -p 1 -t T`
as an operator would, warms the worker with one small job, then inserts N jobs of the largest
size IMAGEN_MAX_PIXELS allows (3840x2160 by default) through the mock backend, and samples the
worker process's RSS every 50 ms: at rest, its peak while the jobs run, and after they are done
(again after a short idle). The figures in docs/security.md and docs/reliability.md come from it
(issue 14: memory must be bounded and come back near rest).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from imagen.devtools.bench.procs import MemoryWatch, child_pids, rss_mb
from imagen.devtools.bench.sql import QUERIES
from imagen.devtools.runner import DRAMATIQ_READY, PipelineProcesses, listeners_listening, pipeline_env
from imagen.devtools.servers import migrated_servers


@dataclass
class MemoryFigures:
    jobs: int
    threads: int
    size: str
    rest_mb: float
    peak_mb: float
    after_mb: float
    after_idle_mb: float
    seconds: float
    done: int


def _wait(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _ended(conn: psycopg.Connection[Any], ids: list[uuid.UUID]) -> tuple[int, int]:
    """(done, ended in any way) among the jobs."""
    row = conn.execute(QUERIES["jobs_ended"], {"ids": ids}).fetchone()
    return (int(row[0]), int(row[2])) if row else (0, 0)


def measure(jobs: int = 50, threads: int = 8, size: str = "3840x2160", idle: float = 10.0) -> MemoryFigures:
    """Run the measurement on fresh servers; every process and server is stopped however it ends."""
    with contextlib.ExitStack() as stack:
        root, pg, rs = migrated_servers(stack, "imagen-memory-")
        env = pipeline_env(pg.url, rs.url, root, IMAGEN_MAX_PIXELS=str(_pixels(size)))
        procs = PipelineProcesses(env, root / "logs")
        stack.callback(procs.stop)
        master = procs.start_workers(processes=1, threads=threads)
        _wait(lambda: master.tail(10**7).count(DRAMATIQ_READY) >= 1, 60, "the worker")
        procs.start_listener()
        _wait(lambda: listeners_listening(pg.url) > 0, 30, "the listener")
        (worker,) = child_pids(master.popen.pid)
        owner = uuid.uuid4()
        with psycopg.connect(pg.url, autocommit=True) as conn:
            warm = _insert(conn, owner, 1, "64x64")
            _wait(lambda: _ended(conn, warm)[1] == 1, 60, "the warm-up job")
            time.sleep(1.0)
            rest = rss_mb(worker) or 0.0
            with MemoryWatch({"worker": worker}, interval=0.05) as watch:
                started = time.monotonic()
                ids = _insert(conn, owner, jobs, size)
                _wait(lambda: _ended(conn, ids)[1] == jobs, 600, f"{jobs} jobs of {size}")
                took = time.monotonic() - started
            after = rss_mb(worker) or 0.0
            time.sleep(idle)
            after_idle = rss_mb(worker) or 0.0
            done = _ended(conn, ids)[0]
        return MemoryFigures(
            jobs=jobs, threads=threads, size=size, rest_mb=round(rest, 1),
            peak_mb=round(watch.peaks.get("worker", 0.0), 1), after_mb=round(after, 1),
            after_idle_mb=round(after_idle, 1), seconds=round(took, 1), done=done,
        )  # fmt: skip


def _pixels(size: str) -> int:
    width, height = (int(part) for part in size.lower().split("x"))
    return width * height


def _insert(conn: psycopg.Connection[Any], owner: uuid.UUID, n: int, size: str) -> list[uuid.UUID]:
    params = {"owner": owner, "prompt": "memory", "params": Jsonb({"backend": "mock", "size": size}), "n": n}
    rows = conn.execute(QUERIES["jobs_insert"], params).fetchall()
    return [uuid.UUID(str(r[0])) for r in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imagen.devtools.bench.memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--threads", "-t", type=int, default=8)
    parser.add_argument(
        "--size", default="3840x2160", help="WxH of every job (default: IMAGEN_MAX_PIXELS' 3840x2160)"
    )
    parser.add_argument("--idle", type=float, default=10.0, help="seconds to wait before the last sample")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = measure(args.jobs, args.threads, args.size, args.idle)
    if args.json:
        print(json.dumps(asdict(figures)))
    else:
        print(
            f"{figures.jobs} jobs of {figures.size} at -p 1 -t {figures.threads}: {figures.done} done in"
            f" {figures.seconds} s; worker RSS at rest {figures.rest_mb} MB, peak {figures.peak_mb} MB,"
            f" right after {figures.after_mb} MB, after {args.idle:g} s idle {figures.after_idle_mb} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
