"""What a benchmark's figures depend on: the machine, its load and the versions in use (read-only)."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem `path` is on (the longest mount point above it), from /proc/mounts."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    resolved = str(path.resolve())
    best: tuple[int, str] | None = None
    for fields in mounts:
        if len(fields) < 3:
            continue
        point = fields[1]
        inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > best[0]):
            best = (len(point), fields[2])
    return best[1] if best else None


def cpu_pressure() -> float | None:
    """The share of the last 60 s in which some runnable task waited for a CPU (Linux PSI), in %."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    return float(fields["avg60"]) if "avg60" in fields else None


def describe_machine() -> dict[str, Any]:
    """What the figures depend on: CPUs, CPU model, memory, load, versions."""
    import dramatiq

    def first(path: str, prefix: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        except OSError:
            return None
        return None

    mem = first("/proc/meminfo", "MemTotal")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "memory_mb": int(mem.split()[0]) // 1024 if mem else None,
        "loadavg": os.getloadavg(),
        "cpu_pressure": cpu_pressure(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dramatiq": dramatiq.__version__,
        "psycopg": psycopg.__version__,
    }


def postgres_settings(url: str, names: Iterable[str]) -> dict[str, str]:
    """The server's values of these settings, as the run's report shows them."""
    found = {}
    with psycopg.connect(url, autocommit=True) as conn:
        for name in names:
            row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
            found[name] = str(row[0]) if row else "?"
    return found
