"""Mutation testing of the store, the listener and the stages: `.venv/bin/python scripts/mutation.py`.

Runs mutmut (configured in pyproject.toml's [tool.mutmut]: the modules it mutates and
the fast test selection it runs for each mutant) with one throwaway PostgreSQL server
and one migrated template database for the whole run, so a mutant's tests do not
start a server or migrate each time. Then prints the score of each module group and
the surviving mutants, and exits 1 if a group scores under --min-score (docs/testing.md).

mutmut keeps its results in mutants/ and only re-runs mutants whose function changed:
delete mutants/ for a full run from scratch.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {"store": "imagen.store.", "listener": "imagen.listener.", "stages": "imagen.stages"}
KILLED = {"killed", "timeout", "segfault"}  # a mutant that made its tests fail or hang is caught


def start_database() -> tuple[object, str, str]:
    """A throwaway PostgreSQL server and a migrated template database on it."""
    import psycopg

    from imagen import db
    from imagen.devtools.servers import PostgresServer

    server = PostgresServer()
    server.start()
    template = f"imagen_tpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{template}"')
    db.migrate(server.url_for(template))
    return server, server.url, template


def results() -> dict[str, str]:
    """{mutant name: status} for every mutant mutmut knows."""
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run(
        [str(mutmut), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    found = {}
    for line in out.splitlines():
        match = re.match(r"\s*(\S+): (.+)$", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def report(statuses: dict[str, str], min_score: float) -> int:
    by_group: dict[str, Counter[str]] = defaultdict(Counter)
    survivors = []
    for name, status in statuses.items():
        group = next((g for g, prefix in GROUPS.items() if name.startswith(prefix)), "other")
        by_group[group][status] += 1
        if status not in KILLED:
            survivors.append(f"{status:>12}  {name}")
    failing = 0
    print("\nmutation score (killed / all mutants; 'no tests' count as survivors):")
    for group in sorted(by_group):
        counts = by_group[group]
        total = sum(counts.values())
        killed = sum(counts[s] for s in KILLED)
        score = 100.0 * killed / total if total else 100.0
        failing += score < min_score
        detail = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        print(f"  {group:<9} {score:5.1f}%  ({detail})")
    print(f"\nnot killed ({len(survivors)}); `.venv/bin/mutmut show NAME` prints one:")
    print("\n".join(sorted(survivors)))
    return 1 if failing else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--min-score", type=float, default=90.0)
    parser.add_argument("--report-only", action="store_true", help="print the last run's results")
    parser.add_argument("mutants", nargs="*", help="only these mutants (names as `mutmut results` prints)")
    args = parser.parse_args()
    if not args.report_only:
        # A stop (Ctrl-C, SIGTERM from a timeout) still runs the `finally` that stops the server.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        server, url, template = start_database()
        env = {**os.environ, "IMAGEN_TEST_DATABASE_URL": url, "IMAGEN_TEST_TEMPLATE_DB": template}
        started = time.monotonic()
        try:
            mutmut = Path(sys.executable).with_name("mutmut")
            command = [str(mutmut), "run", "--max-children", str(args.max_children), *args.mutants]
            subprocess.run(command, cwd=ROOT, env=env, check=False)
        finally:
            server.cleanup()  # type: ignore[attr-defined]
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime + usage.ru_stime
        load = os.getloadavg()[0]
        print(
            f"\nmutmut run took {time.monotonic() - started:.0f} s, {cpu:.0f} s of CPU (load average {load:.1f})"
        )
    return report(results(), args.min_score)


if __name__ == "__main__":
    sys.exit(main())
