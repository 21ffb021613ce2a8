"""The baselines' code, written to a temp dir and run in subprocesses.

The raw PostgreSQL schema and claimer and the bare Dramatiq actors, as source
text; `DONE_KEY` is the Redis list the bare actors push each finished token to.
"""

from __future__ import annotations

DONE_KEY = "bench:done"

RAW_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE bench.raw_jobs (id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
                             created_at timestamptz NOT NULL DEFAULT now(), claimed_at timestamptz);
CREATE INDEX ON bench.raw_jobs (id) WHERE status = 'pending';
CREATE FUNCTION bench.raw_notify() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_notify('bench_raw', ''); RETURN NULL; END $$;
CREATE TRIGGER raw_notify AFTER INSERT ON bench.raw_jobs FOR EACH STATEMENT EXECUTE FUNCTION bench.raw_notify();
CREATE TABLE bench.probe (id bigserial PRIMARY KEY);
CREATE FUNCTION bench.probe_notify() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_notify('bench_probe', ''); RETURN NULL; END $$;
CREATE TRIGGER probe_notify AFTER INSERT ON bench.probe FOR EACH STATEMENT EXECUTE FUNCTION bench.probe_notify();
"""

RAW_CLAIMER = '''"""The raw baseline: a bare LISTEN connection and a plain SKIP LOCKED claim (imagen bench)."""
import os, signal, sys
import psycopg

CLAIM = """UPDATE bench.raw_jobs SET status = 'running', claimed_at = now() WHERE id IN (
    SELECT id FROM bench.raw_jobs WHERE status = 'pending' ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)"""
url = os.environ["BENCH_DATABASE_URL"]
listen = psycopg.connect(url, autocommit=True)
work = psycopg.connect(url, autocommit=True)
listen.execute("LISTEN bench_raw")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("raw claimer ready", flush=True)
while True:
    while work.execute(CLAIM).rowcount == 100:
        pass
    for _ in listen.notifies(timeout=1.0, stop_after=1):
        pass
'''

BARE_ACTORS = '''"""Bare no-op actors for the Dramatiq baselines (imagen bench): a hop and a 3-stage chain."""
import os, time
import dramatiq, redis
from dramatiq.brokers.redis import RedisBroker
from imagen.broker import WakingRedisBroker

URL = os.environ["BENCH_REDIS_URL"]
broker = WakingRedisBroker(url=URL) if os.environ["BENCH_BROKER"] == "imagen" else RedisBroker(url=URL)
dramatiq.set_broker(broker)
results = redis.Redis.from_url(URL)

def finish(token):
    results.rpush("bench:done", "%s %r" % (token, time.time()))

@dramatiq.actor(queue_name="bench-hop")
def hop(token):
    finish(token)

@dramatiq.actor(queue_name="bench-1")
def stage1(token):
    stage2.send(token)

@dramatiq.actor(queue_name="bench-2")
def stage2(token):
    stage3.send(token)

@dramatiq.actor(queue_name="bench-3")
def stage3(token):
    finish(token)
'''
