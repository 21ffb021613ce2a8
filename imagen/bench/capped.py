"""The capped-backend benchmark: does a backend under IMAGEN_BACKEND_CONCURRENCY run at its cap?

`python -m imagen.bench.capped` starts throwaway PostgreSQL and Redis, `imagen listen`
and `dramatiq imagen.actors -p W -t T` with `IMAGEN_BACKEND_CONCURRENCY=mock=C`, then
inserts a backlog of mock jobs whose provider call takes `--latency-ms` (the mock's
`delay_ms`). A backend that runs at its cap makes C / latency calls a second; the
figure is the throughput of the calls (from the usage rows' start and end times) as a
ratio of that, plus the most calls that were ever in flight at once, which must never
pass C. Nothing configured on the machine is touched. See docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import psycopg

from imagen.bench.procs import _clean_env, _processes, _ready, _wait_for
from imagen.runner import DRAMATIQ_READY, listeners_listening, pipeline_env
from imagen.servers import PostgresServer, RedisServer


@dataclass(frozen=True)
class CappedResult:
    cap: int
    latency_ms: int
    jobs: int
    workers: int
    threads: int
    done: int
    failed: int
    calls: int
    seconds: float
    calls_per_second: float
    ideal_per_second: float
    ratio: float
    most_in_flight: int

    def lines(self) -> list[str]:
        return [
            f"capped backend: cap {self.cap}, call latency {self.latency_ms} ms, {self.jobs} jobs, "
            f"{self.workers} worker process(es) x {self.threads} threads",
            f"jobs done {self.done}, failed {self.failed}; provider calls {self.calls}",
            f"throughput {self.calls_per_second:.2f} calls/s against cap / latency = "
            f"{self.ideal_per_second:.2f}/s: ratio {self.ratio:.3f}",
            f"most calls in flight at once {self.most_in_flight} (cap {self.cap})",
        ]


# Each call's interval: the usage row is written when the call ends, `latency_ms` after it began.
CALLS = """
SELECT extract(epoch FROM created_at) - latency_ms / 1000.0, extract(epoch FROM created_at)
FROM imagen.usage WHERE backend = 'mock' AND job_id = ANY(%(ids)s)
"""


def most_overlapping(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that hold at one instant (an end before a start at the same time)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    most = current = 0
    for _, step in events:
        current += step
        most = max(most, current)
    return most


def run_capped(cap: int, latency_ms: int, jobs: int, workers: int, threads: int) -> CappedResult:
    from imagen.db import migrate

    with contextlib.ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="imagen-bench-capped-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        pg, rd = PostgresServer(), RedisServer()
        stack.callback(pg.cleanup)
        stack.callback(rd.cleanup)
        pg.start()
        rd.start()
        migrate(pg.url)
        env = _clean_env(
            pipeline_env(pg.url, rd.url, root / "files"),
            IMAGEN_BACKEND_CONCURRENCY=f"mock={cap}",
            IMAGEN_KEEP_LOCAL_COPY="false",
        )
        procs = stack.enter_context(_processes(env, root / "pipeline"))
        proc = procs.start_workers(processes=workers, threads=threads)
        _wait_for(lambda: _ready(proc, DRAMATIQ_READY, workers), 60, f"{workers} imagen worker(s)")
        procs.start_listener()
        _wait_for(lambda: listeners_listening(pg.url) > 0, 30, "the listener's LISTEN")
        params = json.dumps({"backend": "mock", "size": "64x64", "delay_ms": latency_ms})
        with psycopg.connect(pg.url, autocommit=True) as conn:
            ids = [
                row[0]
                for row in conn.execute(
                    "INSERT INTO imagen.jobs (owner_user_id, prompt, params)"
                    " SELECT gen_random_uuid(), 'capped ' || i, %s::jsonb FROM generate_series(1, %s) i"
                    " RETURNING id",
                    (params, jobs),
                ).fetchall()
            ]
            deadline = time.monotonic() + jobs * latency_ms / 1000 / cap * 3 + 60
            while True:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'failed')"
                    " FROM imagen.jobs WHERE id = ANY(%s)",
                    (ids,),
                ).fetchone()
                assert row is not None
                if row[0] + row[1] == jobs or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            intervals = [(float(a), float(b)) for a, b in conn.execute(CALLS, {"ids": ids}).fetchall()]
    seconds = max(end for _, end in intervals) - min(start for start, _ in intervals)
    # n calls run back to back in batches of `cap` take n / cap latencies: the rate is n / that span.
    per_second = len(intervals) / seconds
    ideal = cap / (latency_ms / 1000)
    return CappedResult(
        cap=cap, latency_ms=latency_ms, jobs=jobs, workers=workers, threads=threads, done=int(row[0]),
        failed=int(row[1]), calls=len(intervals), seconds=round(seconds, 3),
        calls_per_second=round(per_second, 3), ideal_per_second=round(ideal, 3),
        ratio=round(per_second / ideal, 4), most_in_flight=most_overlapping(intervals),
    )  # fmt: skip


@click.command()
@click.option(
    "--cap", type=click.IntRange(min=1), default=4, show_default=True, help="IMAGEN_BACKEND_CONCURRENCY"
)
@click.option(
    "--latency-ms", type=click.IntRange(min=10), default=500, show_default=True, help="each call's time"
)
@click.option("--jobs", type=click.IntRange(min=10), default=200, show_default=True, help="backlog size")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="worker processes")
@click.option(
    "--threads", type=click.IntRange(min=1), default=8, show_default=True, help="threads per process"
)
@click.option("--json", "as_json", is_flag=True, help="print the figures as JSON")
def main(cap: int, latency_ms: int, jobs: int, workers: int, threads: int, as_json: bool) -> None:
    """Throughput of a backend held to IMAGEN_BACKEND_CONCURRENCY, against cap / latency."""
    result = run_capped(cap, latency_ms, jobs, workers, threads)
    click.echo(json.dumps(asdict(result), indent=2) if as_json else "\n".join(result.lines()))
    if result.failed or result.most_in_flight > cap:
        sys.exit(1)


if __name__ == "__main__":
    main()
