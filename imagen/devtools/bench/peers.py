"""`imagen bench --peers`: the pipeline next to pgqueuer and procrastinate, on the same fresh servers.

Each peer runs two jobs, registered and started the way its docs show, with its
defaults: a no-op, and our job's work (render the 64x64 mock image, store it,
write the images row and the usage row; the peer then ends its job); each pushes
its token and `time.time()` to a Redis list when it is done. Ours runs the real
job through `imagen listen` and `dramatiq imagen.actors -p 1`; its start is split at
the claim, next to the bare Dramatiq hop of `imagen bench` on the same Redis, so the
run shows what follows our claim that a peer's start does not have. Every system gets
one worker process. The peers are an optional extra (`pip install -e
'.[peers]'`), not dependencies of imagen.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import redis
from psycopg.types.json import Jsonb

from imagen.broker import WakingRedisBroker
from imagen.devtools.bench.config import JOB_PARAMS, BenchConfig, BenchError, Echo
from imagen.devtools.bench.peers_report import LATENCY_ROWS, PEERS, START_PARTS, peers_json, render_peers
from imagen.devtools.bench.procs import clean_env, processes, spawn, wait_for
from imagen.devtools.bench.report import Report, Summary
from imagen.devtools.bench.run import JOB_INSERT, JOB_POLL, BenchRun, execute, stamped
from imagen.devtools.bench.sql import QUERIES
from imagen.devtools.runner import Proc

__all__ = ["missing_peer_modules", "peers_json", "render_peers", "run_peers"]

PEER_MODULES = ("pgqueuer", "asyncpg", "procrastinate")
STARTED_KEY = "bench:started"

# What our job does, for a peer's job: render the 64x64 mock image, store it (one file), write the
# images row and the usage row (one statement), and end (the peer marks its own job done).
PEER_WORK = '''"""The work of one imagen job, done by a peer's job (imagen bench --peers)."""
import os, time, uuid
import psycopg, redis
from pathlib import Path
from psycopg.types.json import Jsonb
from imagen.backends.mock import render_png

FILES = Path(os.environ["BENCH_FILES"])
OWNER = uuid.UUID("00000000-0000-4000-8000-0000000000be")
ROWS = """
WITH usage AS (
    INSERT INTO imagen.usage (backend, model, images, ok, latency_ms, cost_usd, cost_basis, owner_user_id, call_id)
    VALUES ('mock', 'mock-1', 1, true, %(ms)s, 0, 'free', %(owner)s, %(call)s)
)
INSERT INTO imagen.images (owner_user_id, bucket, path, mime, width, height, bytes, prompt, backend, model, params)
VALUES (%(owner)s, 'bench', %(path)s, 'image/png', 64, 64, %(bytes)s, %(prompt)s, 'mock', 'mock-1', %(params)s)
"""
results = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
conn = psycopg.connect(os.environ["BENCH_DATABASE_URL"], autocommit=True)

def work(token: str) -> None:
    started, prompt, path = time.perf_counter(), "bench " + token, "%s.png" % uuid.uuid4()
    png = render_png(prompt, 1, 64, 64)
    (FILES / path).write_bytes(png)
    conn.execute(ROWS, {"ms": (time.perf_counter() - started) * 1000, "owner": OWNER, "call": uuid.uuid4(),
                        "path": path, "bytes": len(png), "prompt": prompt,
                        "params": Jsonb({"backend": "mock", "size": "64x64"})})
    results.rpush("bench:started", "%s %r" % (token, time.time()))
'''

PGQUEUER_APP = '''"""pgqueuer's no-op worker (imagen bench --peers), as its docs write one."""
import asyncio, contextlib, os, time
import asyncpg, redis
import peer_work
from pgqueuer import PgQueuer
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job

results = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])

@contextlib.asynccontextmanager
async def main():
    conn = await asyncpg.connect(os.environ["BENCH_DATABASE_URL"])
    pgq = PgQueuer(AsyncpgDriver(conn))

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        results.rpush("bench:started", "%s %r" % (job.payload.decode(), time.time()))

    @pgq.entrypoint("work")
    async def work(job: Job) -> None:
        peer_work.work(job.payload.decode())

    try:
        yield pgq
    finally:
        await conn.close()

if __name__ == "__main__":
    # What `pgq run peer_pgqueuer:main` does. pgqueuer 1.6.0's CLI fails in its logger setup
    # under typer 0.29 ("'str' object has no attribute 'name'"), so the same call in-process.
    from pgqueuer import run
    asyncio.run(run(main))
'''

PROCRASTINATE_APP = '''"""procrastinate's no-op worker (imagen bench --peers), as its docs write one."""
import os, time
import redis
import peer_work
from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo=os.environ["BENCH_DATABASE_URL"]))
results = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])

@app.task(name="noop")
async def noop(token: str) -> None:
    results.rpush("bench:started", "%s %r" % (token, time.time()))

@app.task(name="work")
async def work(token: str) -> None:
    peer_work.work(token)
'''

TASKS = ("noop", "work")


def missing_peer_modules() -> list[str]:
    """The peers' packages this interpreter cannot import."""
    return [name for name in PEER_MODULES if importlib.util.find_spec(name) is None]


class _Enqueuers:
    """The peers' own client APIs, as an application would call them (sync, autocommit)."""

    def __init__(self, db_url: str) -> None:
        from pgqueuer.adapters.drivers.psycopg import SyncPsycopgDriver
        from pgqueuer.queries import SyncQueries
        from procrastinate import App, SyncPsycopgConnector

        self._conn = psycopg.connect(db_url, autocommit=True)
        self._pgq = SyncQueries(SyncPsycopgDriver(self._conn))
        self._app = App(connector=SyncPsycopgConnector(conninfo=db_url))
        self._app.open()
        self._tasks = {task: self._app.configure_task(name=task) for task in TASKS}

    def one(self, peer: str, token: str, task: str = "noop") -> None:
        if peer == "pgqueuer":
            self._pgq.enqueue(task, token.encode())
        else:
            self._tasks[task].defer(token=token)

    def many(self, peer: str, tokens: list[str], task: str = "noop") -> None:
        if peer == "pgqueuer":
            self._pgq.enqueue([task] * len(tokens), [t.encode() for t in tokens], [0] * len(tokens))
        else:
            kwargs: list[dict[str, Any]] = [{"token": t} for t in tokens]
            self._tasks[task].batch_defer(*kwargs)

    def close(self) -> None:
        self._app.close()
        self._conn.close()


class _PeersRun(BenchRun):
    """Ours and the peers, one worker process each, on the servers `BenchRun` starts; the figures go
    into the same `Report`, keyed as in LATENCY_ROWS and THROUGHPUT_ROWS."""

    def install_peers(self) -> None:
        self.peers_folder = self.root / "peers"
        self.peers_folder.mkdir()
        (self.peers_folder / "peer_pgqueuer.py").write_text(PGQUEUER_APP)
        (self.peers_folder / "peer_procrastinate.py").write_text(PROCRASTINATE_APP)
        (self.peers_folder / "peer_work.py").write_text(PEER_WORK)
        (self.files / "peers").mkdir()
        self.peers_env = clean_env(
            BENCH_DATABASE_URL=self.db_url,
            BENCH_REDIS_URL=self.bare_url,
            BENCH_FILES=str(self.files / "peers"),
            PGDSN=self.db_url,
            PYTHONPATH=str(self.peers_folder),
        )
        for name, argv in (
            ("pgqueuer install", [sys.executable, "-m", "pgqueuer", "install"]),
            (
                "procrastinate schema",
                [sys.executable, "-m", "procrastinate", "--app=peer_procrastinate.app", "schema", "--apply"],
            ),
        ):
            with processes(self.peers_env, self.peers_folder / "install") as procs:
                proc = spawn(procs, name.replace(" ", "-"), argv)
                if proc.popen.wait(60) != 0:
                    raise BenchError(f"{name} failed:\n{proc.tail(2000)}")

    @contextlib.contextmanager
    def _peer(self, peer: str) -> Iterator[Proc]:
        argv = {
            "pgqueuer": [sys.executable, str(self.peers_folder / "peer_pgqueuer.py")],
            "procrastinate": [
                sys.executable,
                "-m",
                "procrastinate",
                "--app=peer_procrastinate.app",
                "worker",
            ],
        }[peer]
        with processes(self.peers_env, self.peers_folder / peer) as procs:
            yield spawn(procs, peer, argv)

    def measure(self) -> None:
        self.echo("installing pgqueuer's and procrastinate's schemas")
        self.install_peers()
        client = redis.Redis.from_url(self.bare_url)
        broker = WakingRedisBroker(url=self.bare_url)
        enqueue = _Enqueuers(self.db_url)
        try:
            with (
                self._pipeline(1) as (listener, workers),
                self._bare_workers("imagen", 1),
                self._peer("pgqueuer") as pgq,
                self._peer("procrastinate") as proc,
            ):
                peers = {"pgqueuer": pgq, "procrastinate": proc}
                self._warm_jobs()
                self._warm_chains(client, broker)
                for peer in PEERS:
                    self._warm_peer(client, enqueue, peer, peers[peer])
                self._peer_latency(client, broker, enqueue)
                self._job_throughput(listener, workers, 1)
                for task in TASKS:
                    for peer in PEERS:
                        self._peer_throughput(client, enqueue, peer, peers[peer], task)
        finally:
            enqueue.close()
            broker.close()
            client.close()

    def _warm_peer(self, client: redis.Redis, enqueue: _Enqueuers, peer: str, worker: Proc) -> None:
        """Jobs one by one until one starts within a second (the worker is up and listening), then
        the warm-up; waits for every one of them, so no late stamp lands in the samples."""
        client.delete(STARTED_KEY)
        probes = 0

        def started() -> bool:
            nonlocal probes
            if not worker.alive():
                raise BenchError(f"{peer} exited with {worker.popen.returncode}:\n{worker.tail(2000)}")
            enqueue.one(peer, "warm")
            probes += 1
            return client.blpop([STARTED_KEY], timeout=1) is not None

        wait_for(started, 60, f"{peer}'s worker")
        for i in range(self.config.warmup):
            enqueue.one(peer, f"w{i}")
        expected = probes - 1 + self.config.warmup
        wait_for(lambda: client.llen(STARTED_KEY) >= expected, 60, f"{peer}'s warm-up jobs")
        client.delete(STARTED_KEY)

    def _peer_latency(self, client: redis.Redis, broker: WakingRedisBroker, enqueue: _Enqueuers) -> None:
        """Sequential samples in a shuffled order each round: one imagen job, a bare Dramatiq hop,
        and for each peer a no-op job and a job doing our work."""
        n = self.config.samples
        self.echo(
            f"latency: {n} rounds of one imagen job, a bare Dramatiq hop and, for pgqueuer and"
            " procrastinate, a no-op job and our job's work"
        )
        values: dict[str, list[float]] = {key: [] for key, _ in (*LATENCY_ROWS, *START_PARTS)}
        owner = uuid.uuid4()
        with (
            psycopg.connect(self.db_url, autocommit=True) as conn,
            psycopg.connect(self.db_url, autocommit=True) as poller,
        ):
            samplers: dict[str, Callable[[int], dict[str, float]]] = {
                "imagen": lambda i: self._imagen_sample(conn, poller, owner),
                "dramatiq_hop": lambda i: {
                    "dramatiq_hop": self._chain_sample(client, broker, "bench-hop", "hop", i)
                },
                "pgqueuer": lambda i: self._peer_sample(client, enqueue, "pgqueuer", i),
                "procrastinate": lambda i: self._peer_sample(client, enqueue, "procrastinate", i),
                "pgqueuer_work": lambda i: self._peer_sample(client, enqueue, "pgqueuer", i, "work"),
                "procrastinate_work": lambda i: self._peer_sample(
                    client, enqueue, "procrastinate", i, "work"
                ),
            }
            for i in range(n):
                order = list(samplers)
                self.random.shuffle(order)
                for name in order:
                    for key, value in samplers[name](i).items():
                        values[key].append(value * 1000)
                    self._gap()
        for key, samples in values.items():
            self.report.latency[key] = Summary.of(samples)

    def _imagen_sample(
        self, conn: psycopg.Connection[Any], poller: psycopg.Connection[Any], owner: uuid.UUID
    ) -> dict[str, float]:
        """From the INSERT sent (`time.time()`): the claim (claimed_at), the generation stage's start
        (`stage_times`) and the job's end (finished_at), each the server's now() on the same host."""
        probe = self._row_sample(
            conn, poller, JOB_INSERT, (owner, Jsonb(JOB_PARAMS)), JOB_POLL, until_done=True
        )
        assert probe.done_clock is not None
        row = conn.execute(QUERIES["probe_start"], (probe.row_id,)).fetchone()
        assert row is not None
        claimed, generating = row[0].timestamp(), row[1].timestamp()
        return {
            "imagen_start": generating - probe.sent_wall,
            "imagen_claimed": claimed - probe.sent_wall,
            "imagen_forward": generating - claimed,
            "imagen_done": probe.done_clock,
        }

    def _peer_sample(
        self, client: redis.Redis, enqueue: _Enqueuers, peer: str, i: int, task: str = "noop"
    ) -> dict[str, float]:
        key = f"{peer}_start" if task == "noop" else f"{peer}_{task}"
        return {
            key: stamped(
                client, STARTED_KEY, lambda: enqueue.one(peer, str(i), task), i, f"{peer} {task} job"
            )
        }

    def _peer_throughput(
        self, client: redis.Redis, enqueue: _Enqueuers, peer: str, worker: Proc, task: str = "noop"
    ) -> None:
        """From the backlog's enqueue returning to the last job's stamp (a no-op's start, the work's
        end), as for our backlog."""
        jobs = self.config.jobs
        what = "no-op jobs" if task == "noop" else "jobs doing our job's work"
        self.echo(f"throughput: {peer} from a backlog of {jobs} {what}, 1 process")
        client.delete(STARTED_KEY)
        enqueue.many(peer, [f"b{i}" for i in range(jobs)], task)
        key = peer if task == "noop" else f"{peer}_{task}"
        self.report.throughput[key] = [self._stamps_rate(client, STARTED_KEY, jobs, worker, key)]


def run_peers(config: BenchConfig, echo: Echo | None = None) -> Report:
    """Run ours and the peers on fresh servers; stop every process and server however it ends."""
    missing = missing_peer_modules()
    if missing:
        raise BenchError(
            f"--peers needs {', '.join(missing)}, not installed here: pip install -e '.[peers]'"
            " (pgqueuer, asyncpg and procrastinate)"
        )
    return execute(_PeersRun, config, echo).report
