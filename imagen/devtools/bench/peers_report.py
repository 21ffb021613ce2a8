"""How `imagen bench --peers` reads: its rows, the idle start's parts, the table and the JSON.

Pure data and formatting, as report.py: nothing here starts a process or talks to a server.
Our start's parts mix two clocks on one host: the server's `now()` (claimed_at, and
`stage_times.generating`, each taken when its statement starts) and the bench's and the
peers' `time.time()`; both read the host's realtime clock, so their differences are
comparable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from imagen.devtools.bench.report import Report, format_value, format_versus, rate

PEERS = ("pgqueuer", "procrastinate")
OURS = "pipeline_1w"  # our backlog figure, as `imagen bench` names it

LATENCY_ROWS = (
    ("imagen_start", "imagen: INSERT sent -> generation stage started (ms)"),
    ("imagen_done", "imagen: INSERT sent -> done, 3 stages + 64x64 image (ms)"),
    ("pgqueuer_start", "pgqueuer: enqueue sent -> no-op job started (ms)"),
    ("procrastinate_start", "procrastinate: defer sent -> no-op job started (ms)"),
    ("pgqueuer_work", "pgqueuer: enqueue sent -> our work done (ms)"),
    ("procrastinate_work", "procrastinate: defer sent -> our work done (ms)"),
)
# Our start in two parts, from the same samples as imagen_start, and a bare hop on the same Redis.
START_PARTS = (
    ("imagen_claimed", "imagen start, 1: INSERT sent -> claimed_at (ms)"),
    ("imagen_forward", "imagen start, 2: claimed_at -> generation stage (ms)"),
    ("dramatiq_hop", "bare Dramatiq hop, same Redis: enqueue -> no-op (ms)"),
)
THROUGHPUT_ROWS = (
    (OURS, "imagen: full jobs from a backlog, 1 process (jobs/s)"),
    ("pgqueuer", "pgqueuer: no-op jobs from a backlog, 1 process (jobs/s)"),
    ("procrastinate", "procrastinate: no-op jobs from a backlog, 1 process (jobs/s)"),
    ("pgqueuer_work", "pgqueuer: our work, from a backlog, 1 process (jobs/s)"),
    ("procrastinate_work", "procrastinate: our work, from a backlog, 1 process (jobs/s)"),
)
LEGEND = (
    "imagen vs this: how many times slower or faster our figure is than the peer's: for latency our"
    " generation stage's start against the peer's no-op start, our job's end against the end of the"
    " peer's job doing the same work; for throughput our full jobs/s against the peer's"
)
PARTS_LEGEND = (
    "imagen start, 1 and 2: the same jobs as our start, split at the claim (the server's now() when"
    " the listener's claim and the worker's fence each began, against the bench's time.time() on the"
    " same host); 2 is the claim's reply, the listener's forward, the Redis hop and the fence's way"
    " to the server. The bare hop: a no-op actor in its own `dramatiq -p 1` on the same Redis,"
    " interleaved with the rounds"
)


@dataclass(frozen=True)
class IdleStart:
    """Our idle start against pgqueuer's, in one run's p50s (ms): the claim, then what follows it."""

    ours: float  # INSERT sent -> generation stage started
    peer: float  # pgqueuer: enqueue sent -> no-op job started
    claimed: float  # INSERT sent -> claimed_at
    forward: float  # claimed_at -> generation stage started
    hop: float  # the bare Dramatiq hop on the same Redis

    @property
    def gap(self) -> float:
        """How much later ours starts than pgqueuer's no-op (negative: sooner)."""
        return self.ours - self.peer

    @property
    def claim_lag(self) -> float:
        """How much later our claim is than pgqueuer's whole start (negative: before it)."""
        return self.claimed - self.peer

    @property
    def rest(self) -> float:
        """What follows the claim besides the hop: its reply, the listener's forward, the worker's
        dispatch and the fence's way to the server."""
        return self.forward - self.hop

    @property
    def parts(self) -> float:
        """claim_lag + hop + rest: the gap rebuilt from its parts (p50s of parts do not add exactly)."""
        return self.claim_lag + self.hop + self.rest


def idle_start(report: Report) -> IdleStart | None:
    """The idle start's parts from the run's p50s, None when the run lacks any of them."""
    keys = ("imagen_start", "pgqueuer_start", "imagen_claimed", "imagen_forward", "dramatiq_hop")
    found = [report.latency.get(key) for key in keys]
    if any(s is None for s in found):
        return None
    ours, peer, claimed, forward, hop = (s.p50 for s in found if s is not None)
    return IdleStart(ours=ours, peer=peer, claimed=claimed, forward=forward, hop=hop)


def idle_start_sentence(start: IdleStart) -> str:
    """What bounds the idle start, in this run's own figures: the gap to pgqueuer's start, split at
    our claim into the claim's lag and the hop and the fence that follow it."""
    gap = f"{_ms(abs(start.gap))} {'later' if start.gap >= 0 else 'sooner'}"
    lag = f"{_ms(abs(start.claim_lag))} {'after' if start.claim_lag >= 0 else 'before'}"
    return (
        f"what bounds the idle start (p50s, ms): ours starts {gap} than pgqueuer's no-op"
        f" ({_ms(start.ours)} against {_ms(start.peer)}); our claim comes {lag} pgqueuer's start"
        f" (INSERT -> claimed_at {_ms(start.claimed)}) and {_ms(start.forward)} follow it to the stage's"
        f" start: the bare Dramatiq hop {_ms(start.hop)} and the rest {_ms(start.rest)} (the claim's reply,"
        f" the listener's forward, the worker's dispatch and fence; the parts add to {_ms(start.parts)}"
        f" against the gap's {_ms(start.gap)})"
    )


def _ms(value: float) -> str:
    return f"{value:.2f}"


def render_peers(report: Report) -> str:
    """The peers' table: each figure, and ours over it (for latency below 1 is ours faster); then our
    start's parts and what bounds it."""
    lines = [f"{'figure':<62} | {'p50':>6} | {'p99':>6} | {'max':>6} | imagen vs this"]
    lines.append("-" * len(lines[0]))
    start, done = report.latency.get("imagen_start"), report.latency.get("imagen_done")
    for key, label in (*LATENCY_ROWS, *START_PARTS):
        s = report.latency.get(key)
        if s is None:
            continue
        mine = start if key.endswith("_start") else done
        peer = key.split("_")[0] in PEERS
        ratio = format_versus(mine.p50, s.p50, "ms") if mine and peer else "-"
        lines.append(
            f"{label:<62} | {format_value(s.p50):>6} | {format_value(s.p99):>6} | {format_value(s.max):>6} | {ratio}"
        )
    ours = rate(report.throughput.get(OURS, []))
    for key, label in THROUGHPUT_ROWS:
        per_second = rate(report.throughput.get(key, []))
        if per_second is None:
            continue
        ratio = format_versus(ours, per_second, "jobs/s") if ours and key != OURS and per_second else "-"
        lines.append(f"{label:<62} | {format_value(per_second):>6} | {'-':>6} | {'-':>6} | {ratio}")
    lines += ["", LEGEND]
    if any(key in report.latency for key, _ in START_PARTS):
        lines.append(PARTS_LEGEND)
    bound = idle_start(report)
    if bound is not None:
        lines.append(idle_start_sentence(bound))
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)


def peers_json(report: Report) -> dict[str, Any]:
    """The peers run as plain JSON types; our backlog figure is "imagen" here."""
    throughput = {}
    for key in (OURS, *PEERS, *(f"{peer}_work" for peer in PEERS)):
        rounds = report.throughput.get(key)
        if rounds:
            t = rounds[0]
            throughput["imagen" if key == OURS else key] = {
                "items": t.items,
                "seconds": t.seconds,
                "per_second": t.per_second,
                "capped": t.capped,
            }
    out: dict[str, Any] = {
        "schema": "imagen-bench-peers-1",
        "machine": report.machine,
        "config": {"jobs": report.config.jobs, "samples": report.config.samples},
        "elapsed_s": round(report.elapsed_s, 1),
        "latency_ms": {k: vars(v) for k, v in report.latency.items()},
        "throughput": throughput,
        "notes": report.notes,
    }
    bound = idle_start(report)
    if bound is not None:
        out["idle_start_ms"] = {
            **asdict(bound),
            "gap": bound.gap,
            "claim_lag": bound.claim_lag,
            "rest": bound.rest,
            "parts": bound.parts,
            "sentence": idle_start_sentence(bound),
        }
    return out
