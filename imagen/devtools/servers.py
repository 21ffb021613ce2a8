"""Throwaway PostgreSQL and Redis servers started from the binaries on PATH.

PostgreSQL runs with fsync=off (nothing here must survive an OS crash) but
synchronous_commit on, so a crash of the server itself loses no commit a client
was told about: the reliability scenarios restart it with 'immediate' stops.

Used by `imagen demo` when nothing is configured, and by the test fixtures and
benchmarks so they never touch a shared server. Each server lives in its own
temporary directory on a free port and is stopped (and its directory removed)
by `stop()`. It must never be pointed at an existing data directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagen.errors import ConfigError

_PG_HINT = (
    "PostgreSQL server binaries (initdb, postgres) were not found on PATH or in /usr/lib/postgresql/*/bin: "
    "install them (Debian: apt-get install postgresql) or set IMAGEN_DATABASE_URL"
)
_REDIS_HINT = "redis-server was not found on PATH: install it (Debian: apt-get install redis-server) or set IMAGEN_REDIS_URL"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _find_pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    return str(candidates[0]) if candidates else None


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}"
            )
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"server did not listen on port {port} within {timeout}s: {log.read_text()[-2000:]}")


def migrated_servers(
    stack: contextlib.ExitStack, prefix: str, *, sql_dir: Path | None = None
) -> tuple[Path, PostgresServer, RedisServer]:
    """A folder of its own (`prefix`...) and fresh PostgreSQL (migrated, from `sql_dir` when given:
    another checkout's) and Redis servers, all removed by `stack` however the caller ends: the set-up
    of a measurement that runs the pipeline."""
    from imagen.db import migrate

    root = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, root, ignore_errors=True)
    pg, rd = PostgresServer(), RedisServer()
    stack.callback(pg.cleanup)
    stack.callback(rd.cleanup)
    pg.start()
    rd.start()
    migrate(pg.url, sql_dir=sql_dir)
    return root, pg, rd


@dataclass
class _Server:
    """What both throwaway servers share: a free port, a folder of their own, one process in its
    own session (so a test's Ctrl-C does not reach it), its output in `server.log`."""

    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="imagen-server-")))
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def _spawn(self, args: list[str], timeout: float, **popen: Any) -> None:
        """Start the server process and wait until it listens on its port."""
        log = self.root / "server.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **popen
            )
        _wait_port(self.port, timeout, self.proc, log)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PostgresServer(_Server):
    """A private PostgreSQL cluster: initdb once, then start/stop/restart freely."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="imagen-pg-")))
    # More `-c name=value` settings, after (and so over) the defaults: `imagen bench --durable`
    # turns fsync back on, `--scale` loads pg_stat_statements.
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run_as(self) -> dict[str, Any]:
        # PostgreSQL refuses to run as root; CI and this machine run tests as root.
        if os.geteuid() != 0:
            return {}
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return {"user": entry.pw_uid, "group": entry.pw_gid}
        raise ConfigError("running as root and no 'postgres' or 'nobody' user exists to run PostgreSQL as")

    def init(self) -> None:
        initdb = _find_pg_binary("initdb")
        if not initdb or not _find_pg_binary("postgres"):
            raise ConfigError(_PG_HINT)
        ids = self._run_as()
        if ids:
            os.chown(self.root, ids["user"], ids["group"])
        subprocess.run(
            [
                initdb,
                "-D",
                str(self.root / "data"),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            cwd=self.root,
            **ids,
        )

    def start(self, timeout: float = 30.0) -> None:
        if not (self.root / "data").exists():
            self.init()
        postgres = _find_pg_binary("postgres")
        assert postgres
        args = [
            postgres, "-D", str(self.root / "data"), "-p", str(self.port), "-k", str(self.root),
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
            "-c", "full_page_writes=off", "-c", "max_connections=200",
            *(arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")),
        ]  # fmt: skip
        self._spawn(args, timeout, cwd=self.root, **self._run_as())
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, *, mode: str = "fast") -> None:
        """Stop the server: 'fast' (SIGINT) or 'immediate' (SIGQUIT, a crash-like stop)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class RedisServer(_Server):
    """A private, non-persistent Redis server."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="imagen-redis-")))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise ConfigError(_REDIS_HINT)
        args = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.root), "--daemonize", "no",
        ]  # fmt: skip
        self._spawn(args, timeout)

    def stop(self) -> None:
        """Kill the server; its data is lost (it keeps nothing on disk)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
