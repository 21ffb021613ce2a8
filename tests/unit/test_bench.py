"""The benchmark's statistics, table and JSON; one slow end-to-end run of `imagen bench --quick`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagen.cli import main
from imagen.devtools.bench import (
    LATENCY_LABELS,
    RATIO_LEGEND,
    BenchConfig,
    Memory,
    Report,
    Row,
    Summary,
    Throughput,
    bench_config,
    build_rows,
    evaluate_targets,
    format_ratio,
    format_value,
    format_versus,
    percentile,
    render_table,
    report_json,
)
from imagen.devtools.bench.config import default_scratch, size_note
from imagen.devtools.bench.machine import filesystem_type


def make_report(**latency_p50: float) -> Report:
    """A report with every figure filled in, as a full run leaves it."""
    report = Report(BenchConfig())
    for index, key in enumerate(LATENCY_LABELS, 1):
        p50 = latency_p50.get(key, float(index))
        report.latency[key] = Summary(n=200, p50=p50, p99=p50 * 3, max=p50 * 4, mean=p50 * 1.1)
    report.throughput = {
        "chain_1w": [Throughput(10_000, 20.0)],
        "chain_2w": [Throughput(10_000, 10.0)],
        "pipeline_1w": [Throughput(10_000, 40.0)],
        "pipeline_2w": [Throughput(10_000, 25.0)],
    }
    report.memory = {
        "listener": Memory(50.0, 55.0),
        "raw_claimer": Memory(30.0, None),
        "worker_2w_master": Memory(25.0, 25.0),
        "worker_2w_1": Memory(60.0, 64.0),
        "worker_2w_2": Memory(61.0, 63.0),
        "dramatiq_2w_1": Memory(40.0, 41.0),
        "dramatiq_2w_2": Memory(40.5, 40.5),
    }
    return report


def test_percentile_interpolates_between_closest_ranks() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([float(v) for v in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0], 0) == 1.0 and percentile([1.0, 2.0, 3.0], 100) == 3.0


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_of_samples() -> None:
    summary = Summary.of([3.0, 1.0, 2.0])
    assert (summary.n, summary.p50, summary.max, summary.mean) == (3, 2.0, 3.0, 2.0)
    assert summary.p99 == pytest.approx(2.98)


def test_ratio_is_value_over_baseline_and_dash_when_undefined() -> None:
    assert format_ratio(3.0, 1.5) == "2.00x"
    assert format_ratio(0.5, 2.0) == "0.25x"
    assert format_ratio(None, 1.0) == "-"
    assert format_ratio(1.0, None) == "-"
    assert format_ratio(1.0, 0.0) == "-"
    # A clock-based baseline can be slightly negative: no meaningful ratio.
    assert format_ratio(1.0, -0.2) == "-"
    assert Row("x", "ms", 2.0, baseline="b", baseline_value=4.0).ratio == 0.5
    assert Row("x", "ms", 2.0, baseline="b", baseline_value=-1.0).ratio is None


def test_values_print_with_about_three_significant_digits() -> None:
    assert [format_value(v) for v in (0.4123, 4.123, 41.23, 412.3, None)] == [
        "0.412",
        "4.12",
        "41.2",
        "412",
        "-",
    ]


def test_throughput_is_items_over_seconds() -> None:
    assert Throughput(1000, 4.0).per_second == 250.0
    assert Throughput(0, 0.0).per_second == 0.0


def test_quick_config_is_smaller_and_explicit_sizes_win() -> None:
    quick = bench_config(quick=True)
    assert quick.quick and quick.jobs < BenchConfig().jobs and quick.samples < BenchConfig().samples
    sized = bench_config(quick=True, jobs=300, samples=3, workers=[2, 1, 2])
    assert (sized.jobs, sized.samples, sized.stock_samples, sized.workers) == (300, 3, 3, (1, 2))
    assert bench_config().workers == (1, 2) and bench_config().jobs == 10_000


def test_a_smaller_run_says_its_target_verdicts_are_indicative_only() -> None:
    assert size_note(bench_config()) is None
    note = size_note(bench_config(quick=True))
    assert note is not None and "backlog 1000 and 50 samples" in note and "indicative only" in note


def test_scratch_defaults_to_a_tmpfs_when_the_machine_has_one(tmp_path: Path) -> None:
    # Like PostgreSQL's fsync=off: the disk must not be part of a figure meant to be the pipeline's.
    assert filesystem_type(Path("/proc/self")) == "proc"
    chosen = default_scratch()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and filesystem_type(shm) == "tmpfs":
        assert chosen == shm
    else:
        assert chosen == Path(tempfile.gettempdir())
    assert bench_config(scratch=tmp_path).scratch == tmp_path


def test_each_pipeline_figure_sits_next_to_its_baseline() -> None:
    report = make_report(pickup=1.0, raw_claim=0.5, done=12.0, dramatiq_chain=3.0)
    rows = {row.figure: row for row in build_rows(report)}
    pickup = rows[LATENCY_LABELS["pickup"]]
    assert (pickup.baseline_value, pickup.ratio) == (0.5, 2.0)
    assert rows[LATENCY_LABELS["done"]].ratio == 4.0
    throughput = rows["throughput from a backlog, -p 2"]
    assert (throughput.p50, throughput.baseline_value, throughput.ratio) == (400.0, 1000.0, 0.4)
    worker = rows["worker process RSS under load, -p 2"]
    assert (worker.p50, worker.baseline_value) == (64.0, 41.0)
    assert rows["listener RSS at rest"].baseline_value == 30.0


def test_targets_compare_against_the_issue_limits() -> None:
    report = make_report(pickup=1.5, done=25.0)
    targets = {t.name: t for t in evaluate_targets(report)}
    assert targets["pickup p50"].met is True
    assert targets["INSERT -> done p50"].met is False
    assert targets["throughput, 2 workers"].value == 400.0 and targets["throughput, 2 workers"].met is True
    assert targets["throughput / bare chain, 2 workers"].value == pytest.approx(0.4)
    assert targets["throughput / bare chain, 2 workers"].met is False
    assert targets["listener RSS"].value == 55.0 and targets["listener RSS"].met is True
    assert {t.met for t in evaluate_targets(Report(BenchConfig()))} == {None}


def test_table_has_the_columns_ratios_and_targets() -> None:
    table = render_table(make_report(pickup=1.0, raw_claim=0.5))
    header = table.splitlines()[0]
    assert [cell.strip() for cell in header.split("|")] == [
        "figure",
        "p50",
        "p99",
        "max",
        "baseline",
        "vs baseline",
    ]
    assert "2.00x slower" in table
    assert RATIO_LEGEND in table
    assert "target pickup p50 <= 2.00 ms: 1.00 -> met" in table
    assert "MISSED" in table


def test_json_has_every_figure_and_is_plain_json() -> None:
    data = json.loads(json.dumps(report_json(make_report())))
    assert set(data) >= {
        "machine",
        "config",
        "latency_ms",
        "throughput",
        "memory_mb",
        "rows",
        "targets",
        "notes",
    }
    assert set(data["latency_ms"]) == set(LATENCY_LABELS)
    assert set(data["latency_ms"]["pickup"]) == {"n", "p50", "p99", "max", "mean"}
    assert data["throughput"]["pipeline_2w"]["per_second"] == 400.0
    assert data["memory_mb"]["listener"] == {"rest": 50.0, "load": 55.0}
    assert {"figure", "unit", "p50", "p99", "max", "baseline", "baseline_value", "ratio"} == set(
        data["rows"][0]
    )
    assert len(data["targets"]) == 7 and all(t["met"] is not None for t in data["targets"])


def test_backlog_rounds_show_their_medians_and_every_round_side_by_side() -> None:
    # Three rounds, the second slow for both series (a busy neighbour): the table shows the
    # medians (and their ratio), and a line under it shows what each round measured.
    report = make_report()
    report.throughput["chain_2w"] = [Throughput(10_000, s) for s in (8.0, 12.5, 10.0)]
    report.throughput["pipeline_2w"] = [Throughput(10_000, s) for s in (11.0, 20.0, 12.5)]
    (row,) = [r for r in build_rows(report) if r.figure == "throughput from a backlog, -p 2"]
    assert (row.p50, row.baseline_value) == (800.0, 1000.0)
    (target,) = [t for t in evaluate_targets(report) if t.unit == "x"]
    assert target.value == pytest.approx(0.8) and target.met
    table = render_table(report)
    assert "rounds -p 2: pipeline 909 / 500 / 800 jobs/s, bare chain 1250 / 800 / 1000 chains/s," in table
    assert "ratio round by round 0.73 / 0.62 / 0.80" in table
    assert "rounds -p 1" not in table, "one round: nothing more to show"
    data = json.loads(json.dumps(report_json(report)))
    assert data["throughput"]["pipeline_2w"]["per_second"] == 800.0
    assert [r["seconds"] for r in data["throughput"]["pipeline_2w"]["rounds"]] == [11.0, 20.0, 12.5]


def test_workers_option_refuses_a_bad_list() -> None:
    result = CliRunner().invoke(main, ["bench", "--workers", "one,2"])
    assert result.exit_code == 2 and "comma-separated" in result.output
    result = CliRunner().invoke(main, ["bench", "--workers", "0"])
    assert result.exit_code == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server and PostgreSQL binaries")
def test_quick_bench_end_to_end_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = [
        sys.executable,
        "-m",
        "imagen",
        "bench",
        "--quick",
        "--jobs",
        "200",
        "--samples",
        "5",
        "--rounds",
        "2",
    ]
    argv += ["--scratch", str(scratch)]
    result = subprocess.run([*argv, "--json", str(out)], capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(scratch.iterdir()) == [], "the images of the run are removed with it"
    assert "target pickup p50" in result.stdout
    data = json.loads(out.read_text())
    assert set(data["latency_ms"]) == set(LATENCY_LABELS)
    assert all(data["latency_ms"][key]["n"] >= 5 for key in LATENCY_LABELS if key != "dramatiq_chain_stock")
    assert set(data["throughput"]) == {"chain_1w", "chain_2w", "pipeline_1w", "pipeline_2w"}
    rounds = [r for figure in data["throughput"].values() for r in figure["rounds"]]
    assert len(rounds) == 8 and all(r["items"] == 200 and r["failed"] == 0 for r in rounds)
    assert "rounds -p 2: pipeline" in result.stdout
    assert data["machine"]["scratch"].startswith(f"{scratch} (")
    assert data["memory_mb"]["listener"]["rest"] and data["memory_mb"]["listener"]["load"]
    assert data["memory_mb"]["worker_2w_1"]["load"] and data["memory_mb"]["dramatiq_2w_1"]["load"]
    assert all(row["p50"] is not None for row in data["rows"])
    assert all(target["value"] is not None for target in data["targets"])


def test_peers_without_their_packages_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from imagen.devtools.bench import peers

    monkeypatch.setattr(peers, "missing_peer_modules", lambda: ["pgqueuer", "procrastinate"])
    result = CliRunner().invoke(main, ["bench", "--peers", "--quick"])
    assert result.exit_code != 0
    assert "pgqueuer, procrastinate" in result.output and "pip install -e '.[peers]'" in result.output


def test_peers_refuses_the_options_it_would_ignore() -> None:
    for extra in (["--workers", "1,2"], ["--rounds", "2"]):
        result = CliRunner().invoke(main, ["bench", "--peers", *extra])
        assert result.exit_code == 2
        assert "drop --workers and --rounds" in result.output


def test_peers_table_puts_ours_over_each_peer() -> None:
    from imagen.devtools.bench.peers import render_peers

    report = Report(bench_config(quick=True))
    report.latency = {
        "imagen_start": Summary.of([3.0]),
        "imagen_done": Summary.of([5.0]),
        "pgqueuer_start": Summary.of([2.0]),
        "procrastinate_start": Summary.of([6.0]),
    }
    report.throughput = {
        "pipeline_1w": [Throughput(600, 1.0)],
        "pgqueuer": [Throughput(6000, 1.0)],
        "procrastinate": [Throughput(300, 1.0)],
    }
    lines = {
        line.split("|")[0].strip(): line.split("|")[-1].strip() for line in render_peers(report).splitlines()
    }
    assert lines["pgqueuer: enqueue sent -> no-op job started (ms)"] == "1.50x slower"
    assert lines["procrastinate: defer sent -> no-op job started (ms)"] == "2.00x faster"
    assert lines["pgqueuer: no-op jobs from a backlog, 1 process (jobs/s)"] == "10.00x slower"
    assert lines["procrastinate: no-op jobs from a backlog, 1 process (jobs/s)"] == "2.00x faster"


def peers_report(**p50: float) -> Report:
    """A peers report with each latency figure at the given p50, and our backlog rate."""
    report = Report(bench_config(quick=True))
    report.latency = {key: Summary.of([value]) for key, value in p50.items()}
    report.throughput = {"pipeline_1w": [Throughput(600, 1.0)]}
    return report


IDLE = {
    "imagen_start": 3.5,
    "imagen_done": 5.2,
    "pgqueuer_start": 2.8,
    "procrastinate_start": 3.3,
    "imagen_claimed": 1.9,
    "imagen_forward": 1.55,
    "dramatiq_hop": 1.2,
}


def test_idle_start_splits_the_gap_to_pgqueuer_at_our_claim() -> None:
    from imagen.devtools.bench.peers_report import idle_start

    start = idle_start(peers_report(**IDLE))
    assert start is not None
    assert round(start.gap, 6) == 0.7  # ours 3.5 - pgqueuer's 2.8
    assert round(start.claim_lag, 6) == -0.9  # our claim at 1.9, before pgqueuer's start
    assert round(start.rest, 6) == 0.35  # claimed -> stage 1.55 less the hop's 1.2
    assert round(start.parts, 6) == 0.65  # -0.9 + 1.2 + 0.35
    for missing in ("dramatiq_hop", "imagen_claimed", "pgqueuer_start"):
        assert idle_start(peers_report(**{k: v for k, v in IDLE.items() if k != missing})) is None


def test_peers_table_shows_our_start_split_at_the_claim_and_what_bounds_it() -> None:
    from imagen.devtools.bench.peers import render_peers

    table = render_peers(peers_report(**IDLE))
    cells = {
        line.split("|")[0].strip(): [c.strip() for c in line.split("|")[1:]] for line in table.splitlines()
    }
    assert cells["imagen start, 1: INSERT sent -> claimed_at (ms)"] == ["1.90", "1.90", "1.90", "-"]
    assert cells["imagen start, 2: claimed_at -> generation stage (ms)"] == ["1.55", "1.55", "1.55", "-"]
    assert cells["bare Dramatiq hop, same Redis: enqueue -> no-op (ms)"] == ["1.20", "1.20", "1.20", "-"]
    assert cells["pgqueuer: enqueue sent -> no-op job started (ms)"][-1] == "1.25x slower"
    bound = table.splitlines()[-1]
    assert bound.startswith("what bounds the idle start (p50s, ms): ours starts 0.70 later than pgqueuer's")
    assert "our claim comes 0.90 before pgqueuer's start" in bound
    assert "the bare Dramatiq hop 1.20 and the rest 0.35 (the claim's reply" in bound
    assert bound.endswith("the parts add to 0.65 against the gap's 0.70)")


def test_idle_start_says_sooner_and_after_when_ours_leads_or_our_claim_lags() -> None:
    from imagen.devtools.bench.peers import render_peers

    figures = IDLE | {"imagen_start": 2.5, "imagen_claimed": 3.0, "imagen_forward": 0.5, "dramatiq_hop": 0.8}
    bound = render_peers(peers_report(**figures)).splitlines()[-1]
    assert "ours starts 0.30 sooner than pgqueuer's no-op" in bound
    assert "our claim comes 0.20 after pgqueuer's start" in bound
    assert "the bare Dramatiq hop 0.80 and the rest -0.30" in bound


def test_peers_table_without_the_parts_has_no_bound_line() -> None:
    from imagen.devtools.bench.peers import render_peers

    table = render_peers(peers_report(imagen_start=3.5, pgqueuer_start=2.8))
    assert "what bounds" not in table and "imagen start, 1" not in table


def test_peers_json_keeps_its_figures_and_adds_the_idle_start() -> None:
    from imagen.devtools.bench.peers import peers_json

    data = json.loads(json.dumps(peers_json(peers_report(**IDLE))))
    assert data["schema"] == "imagen-bench-peers-1"
    assert set(data["latency_ms"]) == set(IDLE)
    assert data["throughput"]["imagen"]["items"] == 600
    idle = data["idle_start_ms"]
    assert {k: round(idle[k], 6) for k in ("ours", "peer", "claimed", "forward", "hop")} == {
        "ours": 3.5, "peer": 2.8, "claimed": 1.9, "forward": 1.55, "hop": 1.2,
    }  # fmt: skip
    assert {k: round(idle[k], 6) for k in ("gap", "claim_lag", "rest", "parts")} == {
        "gap": 0.7, "claim_lag": -0.9, "rest": 0.35, "parts": 0.65,
    }  # fmt: skip
    assert idle["sentence"].startswith("what bounds the idle start")
    assert "idle_start_ms" not in peers_json(peers_report(imagen_start=3.5, pgqueuer_start=2.8))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server and PostgreSQL binaries")
def test_peers_bench_runs_ours_pgqueuer_and_procrastinate_on_one_pair_of_servers(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    argv = [sys.executable, "-m", "imagen", "bench", "--peers", "--quick", "--jobs", "200", "--samples", "5"]
    result = subprocess.run([*argv, "--json", str(out)], capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["latency_ms"]) == {
        "imagen_start", "imagen_done", "pgqueuer_start", "procrastinate_start", "pgqueuer_work", "procrastinate_work",
        "imagen_claimed", "imagen_forward", "dramatiq_hop",
    }  # fmt: skip
    assert all(s["n"] == 5 and 0 < s["p50"] < 1000 for s in data["latency_ms"].values())
    assert data["latency_ms"]["imagen_start"]["p50"] < data["latency_ms"]["imagen_done"]["p50"]
    # Our start split at the claim, from the same jobs: the parts' means add up to the whole's.
    mean = {
        key: data["latency_ms"][key]["mean"] for key in ("imagen_start", "imagen_claimed", "imagen_forward")
    }
    assert abs(mean["imagen_claimed"] + mean["imagen_forward"] - mean["imagen_start"]) < 0.05
    assert data["idle_start_ms"]["hop"] == data["latency_ms"]["dramatiq_hop"]["p50"]
    assert "what bounds the idle start" in result.stdout
    assert {k: v["items"] for k, v in data["throughput"].items()} == {
        "imagen": 200,
        "pgqueuer": 200,
        "procrastinate": 200,
        "pgqueuer_work": 200,
        "procrastinate_work": 200,
    }
    # Each peer ran our job's work, not only its no-op (5 samples are too few to order their p50s:
    # on a loaded machine a no-op's median came out above the work's).
    assert "pgqueuer: enqueue sent -> our work done" in result.stdout
    assert "procrastinate: defer sent -> our work done" in result.stdout
    assert "procrastinate: no-op jobs from a backlog" in result.stdout


def test_every_row_says_which_way_its_figure_differs_from_the_baseline() -> None:
    """Latency, throughput and memory rows all read 'N.NNx slower/faster/more/less', never a bare ratio."""
    assert format_versus(2.0, 1.0, "ms") == "2.00x slower"
    assert format_versus(0.5, 1.0, "ms") == "2.00x faster"
    assert format_versus(300.0, 400.0, "jobs/s") == "1.33x slower"
    assert format_versus(800.0, 400.0, "jobs/s") == "2.00x faster"
    assert format_versus(60.0, 40.0, "MB") == "1.50x more"
    assert format_versus(1.0, 1.001, "ms") == "1.00x (same)"
    assert format_versus(None, 1.0, "ms") == format_versus(1.0, -0.2, "ms") == "-"
    table = render_table(make_report())
    cells = [line.split("|")[-1].strip() for line in table.splitlines()[2:] if line.count("|") == 5]
    assert cells and all(
        c == "-" or c.split()[-1] in {"slower", "faster", "more", "less", "(same)"} for c in cells
    )


def test_bench_says_no_issue_numbers_in_help_or_output() -> None:
    help_text = CliRunner().invoke(main, ["bench", "--help"]).output
    assert "issue" not in help_text.lower()
    assert "issue" not in render_table(make_report()).lower()
