"""Start the pipeline's real processes (listener, Dramatiq workers) as subprocesses.

Used by `imagen demo`, the benchmarks and the acceptance and reliability tests,
so all of them run exactly what an operator types: `imagen listen` and
`dramatiq imagen.actors`. Logs go to files so a failing test can attach them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DRAMATIQ_READY = "is ready for action"


def listeners_listening(database_url: str) -> int:
    """How many `imagen listen` processes hold their LISTEN in this database (from pg_stat_activity).

    Found by the last statement of the listener's LISTEN connection (the LISTEN itself, or its
    periodic self-check), never by application_name: Supavisor's session mode replaces that.
    Counts only sessions this role may see (its own, or all with pg_read_all_stats).
    """
    import psycopg

    from imagen.listener import HEALTH_SQL, LISTEN_SQL

    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND state = 'idle' AND query IN (%s, %s)",
            (LISTEN_SQL, HEALTH_SQL),
        ).fetchone()
    return int(row[0]) if row else 0


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def send(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a dramatiq master and its worker processes)."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def ready_count(self) -> int:
        """How many Dramatiq worker processes of this master said they are ready."""
        return self.tail(10**7).count(DRAMATIQ_READY)

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class PipelineProcesses:
    """A listener and worker processes sharing one environment."""

    env: dict[str, str]
    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def _spawn(self, name: str, argv: list[str]) -> Proc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / f"{name}-{len(self.procs)}.log"
        out = open(log, "ab")  # noqa: SIM115 - the child owns it
        popen = subprocess.Popen(
            argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True
        )
        out.close()
        proc = Proc(name=name, popen=popen, log=log)
        self.procs.append(proc)
        return proc

    def start_listener(self) -> Proc:
        return self._spawn("listener", [sys.executable, "-m", "imagen", "listen"])

    def start_workers(self, processes: int = 1, threads: int | None = 4, *extra: str) -> Proc:
        """`dramatiq imagen.actors -p N [-t T]`; threads=None leaves Dramatiq's default, as an operator types it."""
        argv = [sys.executable, "-m", "dramatiq", "imagen.actors", "-p", str(processes)]
        if threads is not None:
            argv += ["-t", str(threads)]
        return self._spawn("workers", [*argv, *extra])

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM everything, wait, then SIGKILL what is left; return exit codes by log name."""
        codes: dict[str, int | None] = {}
        for proc in self.procs:
            proc.send(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                codes[proc.log.name] = proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill_group()
                proc.popen.wait()
                codes[proc.log.name] = None
        self.procs = [p for p in self.procs if p.alive()]
        return codes

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name} ---\n{p.tail()}" for p in self.procs)


def pipeline_env(database_url: str, redis_url: str, workdir: Path, **extra: str) -> dict[str, str]:
    """The environment for pipeline processes: inherited, minus any IMAGEN_* the caller did not set."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEN_")}
    env.update(
        {
            "IMAGEN_DATABASE_URL": database_url,
            "IMAGEN_REDIS_URL": redis_url,
            "IMAGEN_STORAGE": "local",
            "IMAGEN_STORAGE_DIR": str(workdir / "storage"),
            "IMAGEN_OUTPUT_DIR": str(workdir / "out"),
            "IMAGEN_USAGE_SPOOL_DIR": str(workdir / "usage-spool"),
            "IMAGEN_LISTENER_METRICS_PORT": "0",
            "IMAGEN_WORKER_METRICS": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env
