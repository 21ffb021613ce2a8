"""The capped-backend benchmark: does a backend under IMAGEN_BACKEND_CONCURRENCY run at its cap?

`python -m imagen.devtools.bench.capped` starts throwaway PostgreSQL and Redis, a loopback
provider in the OpenAI wire format (`imagen.devtools.bench.provider`) that serves `--cap`
calls at once, each taking `--latency-ms`, and answers 429 beyond, then `imagen
listen` and `dramatiq imagen.actors -p W -t T` with `IMAGEN_BACKEND_CONCURRENCY=
openai=C` and the real openai backend pointed at it. It inserts a backlog of jobs.
A backend that runs at its cap makes C / latency calls a second: the figure is the
served calls per second, from the first call's start to the last call's end as the
provider saw them, as a ratio of that; with the most calls the provider ever saw at
once (never above C) and its 429s. Nothing configured on the machine is touched.
See docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass

import click
import psycopg

from imagen.devtools.bench.procs import clean_env, processes, wait_for
from imagen.devtools.bench.provider import capped_provider
from imagen.devtools.bench.sql import QUERIES
from imagen.devtools.runner import listeners_listening, pipeline_env
from imagen.devtools.servers import migrated_servers


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
    refused: int
    seconds: float
    calls_per_second: float
    ideal_per_second: float
    ratio: float
    most_in_flight: int

    def lines(self) -> list[str]:
        return [
            f"capped backend: cap {self.cap}, call latency {self.latency_ms} ms, {self.jobs} jobs, "
            f"{self.workers} worker process(es) x {self.threads} threads",
            f"jobs done {self.done}, failed {self.failed}; provider calls {self.calls}, answered 429 {self.refused}",
            f"throughput {self.calls_per_second:.2f} calls/s against cap / latency = "
            f"{self.ideal_per_second:.2f}/s: ratio {self.ratio:.3f}",
            f"most calls in flight at once {self.most_in_flight} (cap {self.cap})",
        ]


def run_capped(cap: int, latency_ms: int, jobs: int, workers: int, threads: int) -> CappedResult:
    with contextlib.ExitStack() as stack:
        root, pg, rd = migrated_servers(stack, "imagen-bench-capped-")
        provider = stack.enter_context(capped_provider(capacity=cap, latency_s=latency_ms / 1000))
        env = clean_env(
            pipeline_env(pg.url, rd.url, root / "files"),
            IMAGEN_BACKEND_CONCURRENCY=f"openai={cap}",
            IMAGEN_JOB_BACKENDS="openai",
            IMAGEN_KEEP_LOCAL_COPY="false",
            OPENAI_BASE_URL=provider.base_url,
            OPENAI_API_KEY="sk-bench",
            NO_PROXY="127.0.0.1",
        )
        procs = stack.enter_context(processes(env, root / "pipeline"))
        proc = procs.start_workers(processes=workers, threads=threads)
        wait_for(lambda: proc.ready_count() >= workers, 60, f"{workers} imagen worker(s)")
        procs.start_listener()
        wait_for(lambda: listeners_listening(pg.url) > 0, 30, "the listener's LISTEN")
        params = json.dumps({"backend": "openai", "size": "1024x1024"})
        with psycopg.connect(pg.url, autocommit=True) as conn:
            insert = {"owner": None, "prompt": "capped", "params": params, "n": jobs}
            ids = [row[0] for row in conn.execute(QUERIES["jobs_insert"], insert).fetchall()]
            deadline = time.monotonic() + jobs * latency_ms / 1000 / cap * 3 + 60
            while True:
                row = conn.execute(QUERIES["jobs_ended"], {"ids": ids}).fetchone()
                assert row is not None
                if row[0] + row[1] == jobs or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        with provider.lock:
            spans, refused, most = list(provider.spans), provider.refused, provider.most_in_flight
    seconds = max(end for _, end in spans) - min(start for start, _ in spans)
    per_second = len(spans) / seconds
    ideal = cap / (latency_ms / 1000)
    return CappedResult(
        cap=cap, latency_ms=latency_ms, jobs=jobs, workers=workers, threads=threads, done=int(row[0]),
        failed=int(row[1]), calls=len(spans) + refused, refused=refused, seconds=round(seconds, 3),
        calls_per_second=round(per_second, 3), ideal_per_second=round(ideal, 3),
        ratio=round(per_second / ideal, 4), most_in_flight=most,
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
