"""`imagen bench --scale` and `--durable`: their ratios, verdicts and options (no servers)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagen.cli import main
from imagen.devtools.bench import Summary, Throughput, bench_config
from imagen.devtools.bench.config import DURABLE_SETTINGS
from imagen.devtools.bench.procs import CpuWatch, cpu_seconds
from imagen.devtools.bench.scale import (
    PROBES,
    ClaimCost,
    ScaleReport,
    Step,
    median_round,
    render_scale,
    scale_json,
    scale_ratios,
    scale_targets,
)
from tests.waiting import wait_until


def step(name: str, rate: float, pickup: float, claim_ms: float = 1.0) -> Step:
    return Step(
        name, name, rows=10, pickup=Summary.of([pickup]), rate=Throughput(int(rate * 10), 10.0),
        claims=ClaimCost(10, claim_ms, claim_ms * 2, 32.0, 700.0), probe=Summary.of([claim_ms]),
    )  # fmt: skip


def report() -> ScaleReport:
    out = ScaleReport(bench_config(quick=True))
    out.steps = [
        step("fresh", 300.0, 4.0),
        step("finished", 285.0, 4.2),
        step("owners", 240.0, 4.0),
        step("wide", 300.0, 5.0, claim_ms=6.0),
    ]
    return out


def test_each_step_is_a_ratio_to_the_fresh_table_of_the_same_run() -> None:
    ratios = scale_ratios(report())
    assert ratios["fresh"] == {"rate": 1.0, "pickup": 1.0}
    assert round(ratios["finished"]["rate"] or 0, 3) == 0.95
    assert round(ratios["wide"]["pickup"] or 0, 3) == 1.25


def test_scale_targets_name_the_step_that_missed() -> None:
    verdicts = dict(scale_targets(report()))
    assert verdicts["rate x fresh >= 0.9 (finished)"].endswith("met")
    assert verdicts["rate x fresh >= 0.9 (owners)"] == "0.80 -> MISSED"
    assert verdicts["pickup x fresh <= 1.1 (wide)"] == "1.25 -> MISSED"
    assert verdicts["claim mean <= 5.0 ms at 1,000 x 100"] == "6.00 -> MISSED"
    table = render_scale(report())
    assert "target rate x fresh >= 0.9 (owners): 0.80 -> MISSED" in table
    assert "0.80x" in table


def test_the_claim_probe_shows_its_tail_next_to_its_median() -> None:
    """A 100-job claim's p99 over the step's probes is in the table and the JSON, not only its p50."""
    out = report()
    probes = [2.0] * (PROBES - 1) + [40.0]  # one slow claim among the probes
    out.steps[-1].probe = Summary.of(probes)
    p99 = out.steps[-1].probe.p99
    assert PROBES >= 50 and 2.0 < p99 < 40.0
    table = render_scale(out)
    header, wide = (
        table.splitlines()[0],
        next(line for line in table.splitlines() if line.startswith("wide ")),
    )
    assert header.split("|")[-1].strip() == "probe p50/p99 ms"
    assert wide.split("|")[-1].strip() == f"2.00/{p99:.1f}"
    assert scale_json(out)["steps"][-1]["probe"]["p99"] == p99


def test_durable_run_turns_fsync_on_and_keeps_the_images_on_disk() -> None:
    config = bench_config(durable=True)
    assert config.durable and config.scratch == Path(tempfile.gettempdir())
    assert DURABLE_SETTINGS == {"fsync": "on", "full_page_writes": "on", "synchronous_commit": "on"}
    assert bench_config(durable=True, scratch=Path("/srv")).scratch == Path("/srv")
    assert bench_config().durable is False and bench_config().scratch is None


def test_scale_and_peers_are_two_runs() -> None:
    result = CliRunner().invoke(main, ["bench", "--scale", "--peers"])
    assert result.exit_code == 2 and "give one" in result.output


@pytest.mark.skipif(shutil.which("initdb") is None and not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")),
                    reason="needs the PostgreSQL server binaries")  # fmt: skip
def test_a_durable_bench_server_really_syncs() -> None:
    import psycopg

    from imagen.devtools.servers import PostgresServer

    server = PostgresServer(settings=dict(DURABLE_SETTINGS))
    try:
        server.start()
        with psycopg.connect(server.url) as conn:
            shown = {name: conn.execute(f"SHOW {name}").fetchone() for name in DURABLE_SETTINGS}
        assert shown == {name: ("on",) for name in DURABLE_SETTINGS}
    finally:
        server.cleanup()


def test_a_steps_rate_is_its_median_round_with_the_rounds_spread_beside_it() -> None:
    """One slow backlog of three (a busy neighbour) moves neither the step's rate nor its ratio."""
    out = report()
    owners = out.steps[2]
    owners.rates = [Throughput(2000, 2.0), Throughput(2000, 4.0), Throughput(2000, 2.2)]
    owners.rate = median_round(owners.rates)
    assert owners.rate.per_second == pytest.approx(909.09, abs=0.01)
    row = next(line for line in render_scale(out).splitlines() if line.startswith("owners "))
    assert "500-1000" in row.replace(" ", "")
    assert [r["seconds"] for r in scale_json(out)["steps"][2]["rates"]] == [2.0, 4.0, 2.2]


def test_the_claims_of_a_steps_rounds_add_up_as_one_backlog() -> None:
    from imagen.devtools.bench.scale_report import combined_claims

    both = combined_claims([ClaimCost(10, 2.0, 9.0, 40.0, 800.0), ClaimCost(30, 4.0, 5.0, 20.0, 1200.0)])
    assert both == ClaimCost(40, 3.5, 9.0, 25.0, 1100.0)
    assert combined_claims([]) is None


def test_the_cpu_a_job_costs_is_shown_by_process_next_to_the_fresh_steps() -> None:
    out = report()
    for s, machine in zip(out.steps, (1.6, 1.7, 1.9, 2.0), strict=True):
        s.cpu_ms = {"workers": 1.0, "listener": 0.07, "postgres": 0.5, "redis": 0.06, "machine": machine}
    lines = render_scale(out).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("CPU per job, ms"))
    assert lines[start].split("|")[1:] == [
        " workers ",
        " listener ",
        " PostgreSQL ",
        " Redis ",
        " machine ",
        " machine x fresh",
    ]
    owners = next(line for line in lines[start:] if line.startswith("owners "))
    assert owners.split("|")[-1].strip() == "1.19x"
    assert scale_json(out)["steps"][2]["cpu_ms"]["postgres"] == 0.5


def test_cpu_watch_counts_a_process_that_started_inside_the_window() -> None:
    """A backend PostgreSQL starts during a backlog counts from zero, and the machine's total has it."""
    started: list[int] = []
    with CpuWatch({"children": lambda: list(started)}) as watch:
        # Busy for a while, then waits on its stdin: still there when the window closes.
        child = subprocess.Popen(
            [sys.executable, "-c", "sum(range(30_000_000)); input()"], stdin=subprocess.PIPE
        )
        started.append(child.pid)
        wait_until(lambda: (cpu_seconds(child.pid) or 0.0) >= 0.2, timeout=30, message="the child's loop")
    child.communicate(b"\n", timeout=30)
    assert watch.used["children"] >= 0.2
    assert watch.used["machine"] >= watch.used["children"] * 0.9
