-- ---- section: operator - what `imagen jobs ...` and `imagen web` read and change ----
-- (imagen/store/postgres_operator.py). They read the tables, cancel or retry through jobs.sql's
-- cancel_job / retry_job, and delete only terminal rows (prune). Each read is shaped to stay cheap
-- on a table of millions of rows: the indexes are in sql/010_dashboard_indexes.sql, and
-- tests/integration/test_web.py checks the plans use them.

-- name: list_jobs
-- Newest first; every filter is off when its parameter is NULL.
SELECT id, owner_user_id, status, stage, attempt, prompt, error, image_id,
       created_at, claimed_at, finished_at
FROM imagen.jobs
WHERE (%(statuses)s::text[] IS NULL OR status = ANY(%(statuses)s::text[]))
  AND (%(owner)s::uuid IS NULL OR owner_user_id = %(owner)s::uuid)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
  AND (%(pattern)s::text IS NULL OR prompt ILIKE %(pattern)s::text)
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;

-- name: status_counts
SELECT status, stage, count(*) FROM imagen.jobs GROUP BY status, stage;

-- name: capped_counts
-- Counting a million done jobs exactly would scan a million index entries on every refresh of the
-- dashboard: each count stops at %(cap)s. One count per status, each with its status as a literal so
-- the planner picks that status's best path (the partial pending/running indexes, whose
-- predicates the always-true `fair_round`/`owner_user_id IS NOT NULL` name, sql/015 and 016, or
-- jobs_status_created_idx) from its statistics; a parameter would get one generic plan.
SELECT 'pending', (SELECT count(*) FROM (SELECT 1 FROM imagen.jobs WHERE status = 'pending' AND fair_round IS NOT NULL LIMIT %(cap)s) c)
UNION ALL
SELECT 'running', (SELECT count(*) FROM (SELECT 1 FROM imagen.jobs WHERE status = 'running' AND owner_user_id IS NOT NULL LIMIT %(cap)s) c)
UNION ALL
SELECT 'done', (SELECT count(*) FROM (SELECT 1 FROM imagen.jobs WHERE status = 'done' LIMIT %(cap)s) c)
UNION ALL
SELECT 'failed', (SELECT count(*) FROM (SELECT 1 FROM imagen.jobs WHERE status = 'failed' LIMIT %(cap)s) c)
UNION ALL
SELECT 'cancelled', (SELECT count(*) FROM (SELECT 1 FROM imagen.jobs WHERE status = 'cancelled' LIMIT %(cap)s) c);

-- name: pending_count
-- `fair_round IS NOT NULL` is always true of a pending job (jobs_fair_round_check); it names
-- jobs_claim_idx's predicate, the only index of every pending job (sql/015_claim_plan.sql).
SELECT count(*) FROM imagen.jobs WHERE status = 'pending' AND fair_round IS NOT NULL;

-- name: oldest_pending
SELECT extract(epoch FROM now() - min(created_at))::float8 FROM imagen.jobs
WHERE status = 'pending' AND fair_round IS NOT NULL;

-- name: running_by_stage
-- `owner_user_id IS NOT NULL`: always true, it names jobs_running_idx (sql/016_stage_plan.sql).
SELECT coalesce(stage, 'none'), count(*) FROM imagen.jobs
WHERE status = 'running' AND owner_user_id IS NOT NULL GROUP BY 1;

-- name: last_claim
-- The running jobs through the partial jobs_running_idx; finished ones through jobs_finished_idx.
SELECT greatest(
    (SELECT max(claimed_at) FROM imagen.jobs WHERE status = 'running' AND owner_user_id IS NOT NULL),
    (SELECT max(claimed_at) FROM imagen.jobs WHERE finished_at >= now() - make_interval(secs => %(window)s))
);

-- name: finished_window
-- Jobs that finished in the last %(window)s seconds: counts by status, and p50/p95 pickup and total
-- of the done ones. Pickup is pending -> (last) claim, counted from the INSERT or from when a retry or
-- rescue last made the job pending again; total is INSERT -> finished. The first row (minute NULL)
-- is the whole window (`imagen jobs stats`, the health view's figures); with %(by_minute)s, one row
-- per minute follows (the health charts), from `start`, the first whole minute of the window.
SELECT minute, date_trunc('minute', now()) - make_interval(secs => %(window)s) + interval '1 minute' AS start,
    count(*) FILTER (WHERE status = 'done'),
    count(*) FILTER (WHERE status = 'failed'),
    count(*) FILTER (WHERE status = 'cancelled'),
    percentile_cont(0.5) WITHIN GROUP (ORDER BY pickup) FILTER (WHERE status = 'done' AND pickup IS NOT NULL),
    percentile_cont(0.95) WITHIN GROUP (ORDER BY pickup) FILTER (WHERE status = 'done' AND pickup IS NOT NULL),
    percentile_cont(0.5) WITHIN GROUP (ORDER BY total) FILTER (WHERE status = 'done'),
    percentile_cont(0.95) WITHIN GROUP (ORDER BY total) FILTER (WHERE status = 'done')
FROM (
    SELECT status,
        extract(epoch FROM claimed_at - coalesce(pending_at, created_at))::float8 AS pickup,
        extract(epoch FROM finished_at - created_at)::float8 AS total,
        date_bin('1 minute', finished_at,
                 date_trunc('minute', now()) - make_interval(secs => %(window)s) + interval '1 minute') AS minute
    FROM imagen.jobs
    WHERE finished_at >= now() - make_interval(secs => %(window)s)
) finished
GROUP BY GROUPING SETS ((), (minute))
HAVING grouping(minute) = 1
    OR (%(by_minute)s AND minute >= date_trunc('minute', now()) - make_interval(secs => %(window)s)
                                     + interval '1 minute')
ORDER BY grouping(minute) DESC, minute;

-- name: usage_cost
-- Provider spend over the window; a NULL cost_usd is a call the price table could not cost.
SELECT count(*), coalesce(sum(cost_usd), 0)::float8, count(*) FILTER (WHERE cost_usd IS NULL),
    coalesce(array_agg(DISTINCT backend || '/' || model) FILTER (WHERE cost_usd IS NULL), '{}')
FROM imagen.usage
WHERE created_at >= now() - make_interval(secs => %(window)s);

-- name: owners_today
-- Every owner with usage since midnight UTC (the server's) or a quota override, most spent first.
WITH used AS (
    SELECT owner_user_id, sum(images) FILTER (WHERE ok) AS images, sum(cost_usd) AS cost
    FROM imagen.usage
    WHERE owner_user_id IS NOT NULL
      AND created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
    GROUP BY owner_user_id
)
SELECT coalesce(u.owner_user_id, q.owner_user_id), coalesce(u.images, 0), coalesce(u.cost, 0),
       q.daily_images, q.daily_cost_usd, q.owner_user_id IS NOT NULL
FROM used u FULL JOIN imagen.owner_quotas q ON q.owner_user_id = u.owner_user_id
ORDER BY coalesce(u.cost, 0) DESC, coalesce(u.images, 0) DESC, 1
LIMIT %(limit)s;

-- name: job_image
-- The job's images row: the one the job links, else the one written for it (a job that did not end done).
SELECT id, bucket, path, mime, width, height, bytes, backend, model, created_at
FROM imagen.images
WHERE job_id = %(job_id)s OR id = %(image_id)s::uuid
ORDER BY (id = %(image_id)s::uuid) DESC NULLS LAST
LIMIT 1;

-- name: job_usage
-- cost_usd as float8: numeric reads as Decimal, and every store hands out costs as floats.
SELECT backend, model, images, input_tokens, output_tokens, cost_usd::float8 AS cost_usd, cost_basis,
    latency_ms, ok, error, created_at
FROM imagen.usage
WHERE job_id = %(job_id)s
ORDER BY created_at, id;

-- name: image_row
SELECT id, job_id, owner_user_id, bucket, path, mime, width, height, bytes
FROM imagen.images WHERE id = %(image_id)s;

-- name: count_prunable
-- A terminal job's age is counted from when it finished (created_at for rows that never recorded it).
SELECT count(*) FROM imagen.jobs
WHERE status = ANY(%(statuses)s::text[]) AND status IN ('done', 'failed', 'cancelled')
  AND coalesce(finished_at, created_at) < now() - make_interval(secs => %(age)s);

-- name: prune_batch
-- count_prunable's rows, at most %(batch)s of them, deleted. The images rows of the deleted jobs are
-- detached by their foreign key (job_id set to NULL, sql/006_job_ownership.sql); the count reads the
-- statement's snapshot, taken before that.
WITH gone AS (
    DELETE FROM imagen.jobs WHERE id IN (
        SELECT id FROM imagen.jobs
        WHERE status = ANY(%(statuses)s::text[]) AND status IN ('done', 'failed', 'cancelled')
          AND coalesce(finished_at, created_at) < now() - make_interval(secs => %(age)s)
        LIMIT %(batch)s
        FOR UPDATE SKIP LOCKED
    )
    RETURNING id
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM imagen.images WHERE job_id IN (SELECT id FROM gone));

-- name: listener_sessions
-- Each `imagen listen` holds one dedicated connection for its LISTEN; it is found by its last
-- statement (the LISTEN, or the self-check that replaces it every 10 s, imagen/store/notify.py), never
-- by application_name, which Supavisor's session mode replaces. Another role's sessions are hidden
-- unless this role has pg_read_all_stats.
SELECT pid, host(client_addr), backend_start, state_change
FROM pg_stat_activity
WHERE datname = current_database() AND state = 'idle' AND query IN (%(listen)s, %(health)s)
ORDER BY backend_start;

-- name: image_place
-- Where an image is stored (`imagen smoke` prints it).
SELECT bucket, path FROM imagen.images WHERE id = %(image_id)s;

-- name: images_of_jobs
-- The images rows of several jobs (`imagen demo` prints them).
SELECT id, bucket, path FROM imagen.images WHERE job_id = ANY(%(job_ids)s);
