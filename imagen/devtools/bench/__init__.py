"""The pipeline's benchmark: latency, throughput and memory next to baselines from the same run.

`run_bench` starts its own throwaway PostgreSQL and Redis, the raw PostgreSQL
and bare Dramatiq baselines and the real pipeline (`imagen listen` and
`dramatiq imagen.actors -p N` through imagen.devtools.runner, with the settings we
ship). Latency samples of the pipeline and its baselines are interleaved and
each throughput run sits next to its baseline's, so a noisy neighbour weighs on
both sides of a ratio. It returns a `Report` that renders as a table and JSON.
Every process it starts is stopped when it returns, fails or is interrupted. It
must never touch a configured database or Redis. The method is in
docs/benchmarks.md.
"""

from __future__ import annotations

from imagen.devtools.bench.config import BenchConfig, BenchError, bench_config
from imagen.devtools.bench.report import (
    LATENCY_BASELINE,
    LATENCY_LABELS,
    RATIO_LEGEND,
    Memory,
    Report,
    Row,
    Summary,
    Target,
    Throughput,
    build_rows,
    evaluate_targets,
    format_ratio,
    format_value,
    format_versus,
    percentile,
    render_table,
    report_json,
)
from imagen.devtools.bench.run import run_bench

__all__ = [
    "LATENCY_BASELINE",
    "LATENCY_LABELS",
    "RATIO_LEGEND",
    "BenchConfig",
    "BenchError",
    "Memory",
    "Report",
    "Row",
    "Summary",
    "Target",
    "Throughput",
    "bench_config",
    "build_rows",
    "evaluate_targets",
    "format_ratio",
    "format_value",
    "format_versus",
    "percentile",
    "render_table",
    "report_json",
    "run_bench",
]
