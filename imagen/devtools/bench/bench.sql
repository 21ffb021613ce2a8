-- The benchmark's statements on imagen.* (imagen/devtools/bench/), each under a `-- name:` line and
-- loaded by that name as the runtime's are (imagen/store/queries.py). Only `imagen bench` and the
-- memory and capped-backend measurements run them, on their own throwaway servers.

-- ---- section: the probe job of the latency rounds (run.py, peers.py) ----

-- name: probe_insert
-- Positional parameters: owner, params.
INSERT INTO imagen.jobs (owner_user_id, prompt, params) VALUES (%s, 'bench', %s) RETURNING id;

-- name: probe_poll
-- Polled until the job is claimed, or done (positional: id).
SELECT status, claimed_at, finished_at, error FROM imagen.jobs WHERE id = %s;

-- name: probe_start
-- When the listener's claim and the generation stage began, on the server's clock (positional: id).
SELECT claimed_at, (stage_times->>'generating')::timestamptz FROM imagen.jobs WHERE id = %s;

-- ---- section: the throughput backlog (throughput.py) ----

-- name: backlog_insert
-- The backlog's jobs, spread round-robin over the owners (positional: owners, their count, params, n).
INSERT INTO imagen.jobs (owner_user_id, prompt, params)
SELECT (%s::uuid[])[1 + i %% %s], 'bench ' || i, %s FROM generate_series(1, %s) i;

-- name: backlog_busy
-- Is any of the backlog's jobs still pending, or running? Each probe walks its partial index from
-- the newest end: the entries of jobs already claimed (pending) or finished (running) are dead and
-- sit at the old end until a vacuum, and skipping thousands of them cost ~1.7 ms a probe.
SELECT (SELECT 1 FROM imagen.jobs WHERE status = 'pending' AND owner_user_id = ANY(%(owners)s)
        ORDER BY owner_user_id DESC, created_at DESC LIMIT 1) IS NOT NULL
    OR (SELECT 1 FROM imagen.jobs WHERE status = 'running' AND owner_user_id = ANY(%(owners)s)
        ORDER BY claimed_at DESC LIMIT 1) IS NOT NULL;

-- name: backlog_progress
SELECT count(*) FILTER (WHERE status = 'done'),
       count(*) FILTER (WHERE status IN ('failed', 'cancelled')), max(finished_at)
FROM imagen.jobs WHERE owner_user_id = ANY(%(owners)s);

-- name: backlog_cancel
-- What a time-capped phase left behind, so the next phase starts from an empty queue.
UPDATE imagen.jobs SET status = 'cancelled'
WHERE owner_user_id = ANY(%(owners)s) AND status IN ('pending', 'running');

-- ---- section: a batch of jobs and how far it got (memory.py, capped.py) ----

-- name: jobs_insert
-- %(n)s jobs of one owner, or each of its own when %(owner)s is NULL.
INSERT INTO imagen.jobs (owner_user_id, prompt, params)
SELECT coalesce(%(owner)s::uuid, gen_random_uuid()), %(prompt)s || ' ' || i, %(params)s::jsonb
FROM generate_series(1, %(n)s) i
RETURNING id;

-- name: jobs_ended
-- (done, failed, ended in any way) among the jobs.
SELECT count(*) FILTER (WHERE status = 'done'), count(*) FILTER (WHERE status = 'failed'),
       count(*) FILTER (WHERE status IN ('done', 'failed', 'cancelled'))
FROM imagen.jobs WHERE id = ANY(%(ids)s);

-- ---- section: imagen bench --scale (scale.py) ----

-- name: scale_fill_finished
-- 1,000,000 jobs finished over the last year, from 1,000 owners: no trigger fires (not pending).
INSERT INTO imagen.jobs (owner_user_id, prompt, params, status, attempt, created_at, claimed_at, finished_at)
SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(g %% 1000), 12, '0'))::uuid, 'filler ' || g, %(params)s,
       'done', 1, now() - make_interval(secs => g * 30), now() - make_interval(secs => g * 30),
       now() - make_interval(secs => g * 30 - 2)
FROM generate_series(1, %(n)s) g;

-- name: scale_fill_pending
-- A backlog from `owners` owners, `each` jobs apiece, interleaved in time as they would arrive.
INSERT INTO imagen.jobs (owner_user_id, prompt, params)
SELECT (%(owners)s::uuid[])[1 + g %% %(n_owners)s], 'bench ' || g, %(params)s
FROM generate_series(0, %(n)s - 1) g;

-- name: scale_vacuum
-- Before each step, outside the timed parts: autovacuum is off on the --scale server (scale.py).
VACUUM ANALYZE imagen.jobs;

-- name: scale_rows
SELECT count(*) FROM imagen.jobs;

-- name: scale_cancel_pending
-- The rest of a step's backlog once its first --jobs are timed.
UPDATE imagen.jobs SET status = 'cancelled' WHERE owner_user_id = ANY(%(owners)s) AND status = 'pending';

-- name: scale_running
SELECT count(*) FROM imagen.jobs WHERE status = 'running' AND owner_user_id IS NOT NULL;

-- name: scale_done_since
SELECT count(*) FROM imagen.jobs WHERE finished_at >= %(t0)s AND status = 'done';

-- name: scale_claim_stats
-- The listener's claims (claim_jobs_template, both forms) from pg_stat_statements.
SELECT sum(calls), sum(total_exec_time) / nullif(sum(calls), 0), max(max_exec_time), sum(rows),
       sum(shared_blks_hit + shared_blks_read)
FROM pg_stat_statements WHERE query LIKE 'WITH running AS%%' AND query LIKE '%%FOR UPDATE OF j SKIP LOCKED%%';
