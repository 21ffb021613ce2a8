"""`imagen bench`: the pipeline's benchmark (see docs/benchmarks.md)."""

from __future__ import annotations

import click


@click.command()
def bench() -> None:
    """Measure pickup, end-to-end latency, throughput and memory against baselines."""
    raise click.ClickException("not implemented yet")
