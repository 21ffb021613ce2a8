"""`imagen bench`: the pipeline's benchmark (see docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from imagen.cli.exits import handle_errors
from imagen.cli.options import round_times


def _workers(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(
            f"a comma-separated list of process counts, like 1,2 (not {value!r})"
        ) from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("give at least one process count, each 1 or more")
    return counts


@click.command()
@click.option("--quick", is_flag=True, help="smaller sizes: about a minute instead of about four")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="also write the report here"
)
@click.option(
    "--jobs", type=click.IntRange(min=10), help="backlog size for throughput  [default: 10000; 1000 quick]"
)
@click.option(
    "--samples", type=click.IntRange(min=5), help="sequential latency samples  [default: 200; 50 quick]"
)
@click.option(
    "--workers",
    default="1,2",
    show_default=True,
    callback=_workers,
    help="worker process counts for throughput",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    help="backlog rounds per width, the bare chain then the pipeline each time; the table shows"
    " the medians  [default: 3; 1 quick]",
)
@click.option(
    "--scratch",
    type=click.Path(file_okay=False, exists=True, writable=True, path_type=Path),
    help="folder for the images the pipeline writes  [default: /dev/shm if a tmpfs, else the temp folder]",
)
@click.option(
    "--peers",
    is_flag=True,
    help="instead: our job next to pgqueuer's and procrastinate's, each running a no-op and our job's"
    " work, one worker process each, about a minute; --quick, --jobs, --samples, --scratch and --json"
    " apply (needs pip install -e '.[peers]')",
)
@click.option(
    "--scale",
    is_flag=True,
    help="instead: the pipeline on a fresh table, then after 1,000,000 finished rows, then 3,000"
    " single-job owners and 1,000 owners x 100 jobs: backlog rates, idle pickup, the claim's cost and"
    " CPU per job by process, as ratios to the fresh table, a few minutes; --quick, --jobs (the jobs"
    " timed of each backlog [default: 2000; 1000 quick]), --rounds (backlogs per step, the median"
    " counts [default: 3; 1 quick]),"
    " --samples [default: 30; 15 quick], --scratch, --durable and --json apply",
)
@click.option(
    "--durable",
    is_flag=True,
    help="PostgreSQL with fsync, full_page_writes and synchronous_commit on, and the images on disk"
    " (the temp folder unless --scratch): what an operator's server does",
)
@handle_errors
def bench(
    quick: bool,
    json_path: Path | None,
    jobs: int | None,
    samples: int | None,
    workers: tuple[int, ...],
    rounds: int | None,
    scratch: Path | None,
    peers: bool,
    scale: bool,
    durable: bool,
) -> None:
    """Measure pickup, INSERT -> done, throughput and memory against baselines from the same run.

    Starts its own throwaway PostgreSQL and Redis (nothing configured is touched), the
    raw PostgreSQL and bare Dramatiq baselines, then `imagen listen` and
    `dramatiq imagen.actors -p N` with the settings we ship. Prints a table of each
    figure next to its baseline (how many times slower or faster), then the benchmark's
    targets (docs/benchmarks.md). The images the pipeline
    writes go to a tmpfs when there is one, as PostgreSQL runs with fsync off: the
    figures are the pipeline's, not the disk's (see docs/benchmarks.md).

    With --peers it runs our job next to pgqueuer's and procrastinate's instead, on
    the same fresh servers, and prints each peer's figure with ours over it, our
    start split at the claim next to a bare Dramatiq hop, and what bounds it. With
    --scale it runs one pipeline through a growing table instead (docs/benchmarks.md).
    """
    from imagen.devtools.bench import bench_config, render_table, report_json, run_bench

    config = bench_config(
        quick=quick, jobs=jobs, samples=samples, workers=workers, scratch=scratch, rounds=rounds,
        durable=durable,
    )  # fmt: skip
    if peers and scale:
        raise click.UsageError("--peers and --scale are two different runs: give one")
    if scale:
        _scale(config, quick=quick, jobs=jobs, samples=samples, json_path=json_path)
        return
    if peers:
        source = click.get_current_context().get_parameter_source("workers")
        if rounds is not None or source is not click.core.ParameterSource.DEFAULT:
            raise click.UsageError(
                "--peers runs one worker process per system, once: drop --workers and --rounds"
            )
        from imagen.devtools.bench.peers import peers_json, render_peers, run_peers

        peer_report = run_peers(config, echo=lambda line: click.echo(f"bench: {line}", err=True))
        click.echo(render_peers(peer_report))
        if json_path is not None:
            json_path.write_text(json.dumps(round_times(peers_json(peer_report)), indent=2) + "\n")
        return
    report = run_bench(config, echo=lambda line: click.echo(f"bench: {line}", err=True))
    click.echo(render_table(report))
    if json_path is not None:
        json_path.write_text(json.dumps(round_times(report_json(report)), indent=2) + "\n")


def _scale(
    config: Any, *, quick: bool, jobs: int | None, samples: int | None, json_path: Path | None
) -> None:
    from dataclasses import replace

    from imagen.devtools.bench.scale import render_scale, run_scale, scale_json

    config = replace(config, jobs=jobs or (1000 if quick else 2000), samples=samples or (15 if quick else 30))
    report = run_scale(config, echo=lambda line: click.echo(f"bench: {line}", err=True))
    click.echo(render_scale(report))
    if json_path is not None:
        json_path.write_text(json.dumps(round_times(scale_json(report)), indent=2) + "\n")
