-- Every statement imagen runs on imagen.*, each under a `-- name:` line and loaded by that name
-- (imagen/store/queries.py). The `--` lines right after a name say why the statement is written
-- as it is. Parameters are psycopg's %(name)s; %% is a literal percent sign.

-- ---- section: stages - a job's image row under its fence (imagen/store/postgres_stages.py) ----

-- fragment: image_insert
-- The one INSERT of an images row: owner_user_id, job_id and one column per ImageRow field
-- (tests/unit/test_image_row.py checks they agree). The row belongs to the `job` CTE of the
-- statement it is in (id, owner_user_id): the locked job, or for an image without a job its owner
-- and a NULL id. Each statement says what a second row for the same job does (ON CONFLICT).
INSERT INTO imagen.images (owner_user_id, job_id, bucket, path, mime, width, height, bytes, prompt,
                           backend, model, params)
SELECT job.owner_user_id, job.id, %(bucket)s, %(path)s, %(mime)s, %(width)s, %(height)s, %(bytes)s,
       %(prompt)s, %(backend)s, %(model)s, %(params)s
FROM job

-- name: insert_image
-- An image without a job (`imagen generate --sync`): its owner is the one the caller gives.
WITH job AS (
    SELECT %(owner_user_id)s::uuid AS owner_user_id, %(job_id)s::uuid AS id
)
{image_insert}
ON CONFLICT (job_id) DO UPDATE SET job_id = imagen.images.job_id
RETURNING id;

-- name: begin_sync
-- The sync stage's start: fence + stage + heartbeat, and whether an earlier run already wrote the row.
UPDATE imagen.jobs j
SET stage = 'syncing', heartbeat_at = now(),
    stage_times = j.stage_times || jsonb_build_object('syncing', now())
WHERE j.id = %(id)s AND j.attempt = %(attempt)s AND j.status = 'running'
RETURNING j.id, j.owner_user_id, j.prompt, j.params::text, j.attempt, j.created_at, j.claimed_at,
          (SELECT i.id FROM imagen.images i WHERE i.job_id = j.id AND i.owner_user_id = j.owner_user_id);

-- name: record_job_image
-- Fence, row and stage in one statement: the UPDATE (the fence) locks the job row, so the images row
-- is written only while this attempt still holds the job, and a cancel waits for the commit. An
-- earlier run of this attempt's row is returned again, and only if it is the job owner's.
WITH job AS (
    UPDATE imagen.jobs
    SET stage = 'finalizing', heartbeat_at = now(),
        stage_times = stage_times || jsonb_build_object('finalizing', now())
    WHERE id = %(job_id)s AND attempt = %(attempt)s AND status = 'running'
    RETURNING id, owner_user_id
)
{image_insert}
ON CONFLICT (job_id) DO UPDATE SET job_id = imagen.images.job_id
    WHERE imagen.images.owner_user_id = excluded.owner_user_id
RETURNING id;

-- name: record_and_complete
-- The chained path's end (sync and finalize run in the generation message): fence, images row and
-- done in one statement, with the provider call's usage row when there is one (u_call_id NULL: none).
-- The usage row is written whether or not the fence holds (the call was made and paid either way):
-- one commit for the job's end and its ledger row. The fence locks the job row first, so a cancel
-- waits for the commit, and the job is linked to the row written here or to the one an earlier run
-- of this attempt wrote. 'syncing' is stamped on the server's clock, `sync_seconds` (the upload,
-- timed by the worker) ago.
WITH usage AS (
    {usage_insert}
    WHERE %(u_call_id)s::uuid IS NOT NULL
    ON CONFLICT (call_id) DO NOTHING
),
job AS (
    SELECT id, owner_user_id FROM imagen.jobs
    WHERE id = %(job_id)s AND attempt = %(attempt)s AND status = 'running'
    FOR UPDATE
),
image AS (
    {image_insert}
    ON CONFLICT (job_id) DO UPDATE SET job_id = imagen.images.job_id
        WHERE imagen.images.owner_user_id = excluded.owner_user_id
    RETURNING id, job_id, owner_user_id
)
UPDATE imagen.jobs j
SET status = 'done', image_id = image.id, stage = NULL, error = NULL, last_error = NULL,
    stage_times = j.stage_times || jsonb_build_object(
        'syncing', now() - make_interval(secs => %(sync_seconds)s), 'done', now())
FROM image
WHERE j.id = image.job_id AND j.owner_user_id = image.owner_user_id
RETURNING image.id;

-- ---- section: stages - the discard of an ended job's image (imagen/store/postgres_stages.py) ----

-- name: lock_ended
-- The job's row lock is what a retry (failed/cancelled -> pending) waits for.
SELECT status, owner_user_id, attempt FROM imagen.jobs
WHERE id = %(id)s AND status IN ('failed', 'cancelled')
FOR UPDATE;

-- name: delete_image
DELETE FROM imagen.images WHERE job_id = %(id)s AND owner_user_id = %(owner)s RETURNING path;

-- name: paths_in_use
-- A path another images row still names is not this job's to remove: a detached image of a pruned
-- job whose id an operator gave again (sql/006_job_ownership.sql).
SELECT path FROM imagen.images WHERE bucket = %(bucket)s AND path = ANY(%(paths)s);

-- name: mark_swept
UPDATE imagen.jobs SET image_swept_at = clock_timestamp() WHERE id = %(id)s;

-- name: unswept
-- Jobs that ended since they were last swept, through the partial index that holds only those.
SELECT id FROM imagen.jobs
WHERE status IN ('failed', 'cancelled') AND (image_swept_at IS NULL OR image_swept_at < finished_at)
ORDER BY finished_at
LIMIT %(limit)s;


-- ---- section: stages - usage rows (imagen/store/postgres_stages.py) ----

-- fragment: usage_insert
-- The one INSERT of a usage row: one column per UsageRecord field (tests/unit/test_queries.py checks
-- they agree), its parameters u_-prefixed because the chained end binds the image's own backend,
-- model and job_id beside them. A SELECT, not VALUES, so a statement can add a WHERE.
INSERT INTO imagen.usage (backend, model, images, ok, latency_ms, cost_usd,
                          cost_basis, input_tokens, output_tokens, image_output_tokens, thought_tokens, error,
                          owner_user_id, job_id, created_at, raw, call_id)
SELECT %(u_backend)s, %(u_model)s, %(u_images)s, %(u_ok)s, %(u_latency_ms)s,
       %(u_cost_usd)s, %(u_cost_basis)s, %(u_input_tokens)s, %(u_output_tokens)s, %(u_image_output_tokens)s,
       %(u_thought_tokens)s, %(u_error)s, %(u_owner_user_id)s, %(u_job_id)s, %(u_created_at)s,
       %(u_raw)s, %(u_call_id)s

-- name: insert_usage
-- A row whose call id is already there is left alone: writing a record twice leaves one row.
{usage_insert}
ON CONFLICT (call_id) DO NOTHING;


-- ---- section: stages - owner quotas before a provider call (imagen/quotas.py) ----

-- name: owner_quota
SELECT daily_images, daily_cost_usd FROM imagen.owner_quotas WHERE owner_user_id = %(owner)s;

-- name: owner_quotas
-- Every override at once while there are few (imagen/quotas.py, QuotaBook): one read per interval
-- instead of one per owner.
SELECT owner_user_id, daily_images, daily_cost_usd FROM imagen.owner_quotas LIMIT %(limit)s;

-- name: used_today
-- Midnight UTC of the server's today: the same day boundary for every worker host.
SELECT coalesce(sum(images) FILTER (WHERE ok), 0), coalesce(sum(cost_usd), 0)
FROM imagen.usage
WHERE owner_user_id = %(owner)s
  AND created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
