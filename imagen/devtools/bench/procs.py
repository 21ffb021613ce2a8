"""The processes a benchmark run starts and watches: spawning, readiness, environment, RSS.

Every process started here is owned by a context manager that stops it, however the run ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from imagen.devtools.bench.config import BenchError
from imagen.devtools.runner import PipelineProcesses, Proc


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, from /proc/*/stat (the field after the command's closing paren)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def process_tree(label: str, pid: int) -> dict[str, int]:
    """A dramatiq master and its worker processes as `{label}_master`, `{label}_1`, ..."""
    return {f"{label}_master": pid, **{f"{label}_{i}": child for i, child in enumerate(child_pids(pid), 1)}}


def descendants(pid: int) -> list[int]:
    """A process and every process under it (a dramatiq master's workers, a postmaster's backends)."""
    found = [pid]
    for child in child_pids(pid):
        found += descendants(child)
    return found


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time a process has used so far, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def machine_busy_seconds() -> float:
    """CPU time all CPUs spent busy (not idle, not waiting for I/O) since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")


class CpuWatch:
    """CPU seconds used by named groups of processes, and by the whole machine, between enter and exit.

    Each group's processes are listed again at exit: one that started meanwhile (a backend) counts
    from zero, one that ended meanwhile loses what it used; the machine's total has both.
    """

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.used: dict[str, float] = {}

    def __enter__(self) -> CpuWatch:
        self._start = {
            name: {pid: cpu_seconds(pid) or 0.0 for pid in pids()} for name, pids in self.groups.items()
        }
        self._machine = machine_busy_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {}
        for name, pids in self.groups.items():
            start = self._start[name]
            used = 0.0
            for pid in pids():
                now = cpu_seconds(pid)
                if now is not None:
                    used += max(0.0, now - start.get(pid, 0.0))
            self.used[name] = used
        self.used["machine"] = machine_busy_seconds() - self._machine


class MemoryWatch:
    """Samples the RSS of named processes in a thread and keeps each one's peak."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.pids = pids
        self.interval = interval
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                value = rss_mb(pid)
                if value is not None:
                    self.peaks[name] = max(value, self.peaks.get(name, 0.0))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def proc_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _ready(proc: Proc, text: str, count: int = 1) -> bool:
    if not proc.alive():
        raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail(2000)}")
    return proc.tail(10**7).count(text) >= count


def clean_env(base: dict[str, str] | None = None, /, **extra: str) -> dict[str, str]:
    """The environment as shipped: no inherited IMAGEN_* or dramatiq_* tuning leaks into a phase."""
    env = dict(os.environ if base is None else base)
    env = {k: v for k, v in env.items() if not k.startswith("dramatiq_")}
    if base is None:
        env = {k: v for k, v in env.items() if not k.startswith("IMAGEN_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@contextlib.contextmanager
def processes(env: dict[str, str], workdir: Path) -> Iterator[PipelineProcesses]:
    procs = PipelineProcesses(env, workdir)
    try:
        yield procs
    finally:
        procs.stop(timeout=20)


def spawn(procs: PipelineProcesses, name: str, argv: list[str]) -> Proc:
    procs.workdir.mkdir(parents=True, exist_ok=True)
    log = procs.workdir / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            argv,
            env=procs.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=procs.workdir,
            start_new_session=True,
        )
    proc = Proc(name=name, popen=popen, log=log)
    procs.procs.append(proc)
    return proc


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stamped(client: redis.Redis, key: str, send: Callable[[], object], token: int, what: str) -> float:
    """Send one job that pushes "<token> <time.time()>" to `key` when it runs: seconds from just
    before the send to that stamp (one host, one clock)."""
    started = time.time()
    send()
    got = client.blpop([key], timeout=30)
    if got is None:
        raise BenchError(f"{what} {token} did not finish within 30 s")
    seen, stamp = proc_text(got[1]).split()
    if seen != str(token):
        raise BenchError(f"{what}: expected token {token}, got {seen}")
    return float(stamp) - started
