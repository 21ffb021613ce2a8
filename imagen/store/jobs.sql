-- ---- section: jobs - the job row's life after its claim (imagen/jobs.py) ----
-- Every stage write is fenced on `status = 'running' AND attempt = %(attempt)s`: a write whose
-- fence fails changes no row, and its caller drops the message. The claim comes first: one
-- template, filled in two forms by imagen/jobs.py (CLAIM, CLAIM_WITHIN_CAP).

-- name: claim_jobs_template
-- Fair claim in rounds (sql/012_fair_rounds.sql): each pending job carries the round it is served
-- in, so the claim walks jobs_claim_idx in (fair_round, created_at, id) order and reads only the
-- rows it takes, however many owners wait. Every owner's next job comes before anyone's following
-- one. FOR UPDATE SKIP LOCKED in the walk makes concurrent listeners take disjoint rows.
-- A template in two forms (imagen/jobs.py fills {running} and {limit}): the plain claim
-- (running = NULL, limit = %(limit)s) and the idle path's claim within the in-flight cap, with the
-- running count in the same statement instead of a round trip before it.
WITH running AS MATERIALIZED (
    SELECT {running} AS n
),
locked AS (
    SELECT j.id, j.owner_user_id, j.fair_round, j.created_at
    FROM imagen.jobs j
    WHERE j.status = 'pending' AND j.fair_round IS NOT NULL  -- always true (jobs_fair_round_check),
    ORDER BY j.fair_round, j.created_at, j.id                -- and it names jobs_claim_idx
    LIMIT {limit}
    FOR UPDATE OF j SKIP LOCKED
),
positioned AS (
    SELECT id, owner_user_id, row_number() OVER (ORDER BY fair_round, created_at, id) AS pos FROM locked
),
owners AS (
    -- At most max_owners owners per batch, in the order their first job comes.
    SELECT owner_user_id, row_number() OVER (ORDER BY min(pos)) AS owner_order
    FROM positioned GROUP BY owner_user_id
),
chosen AS (
    SELECT p.id, p.pos FROM positioned p JOIN owners o ON o.owner_user_id = p.owner_user_id
    WHERE o.owner_order <= %(max_owners)s
)
UPDATE imagen.jobs j
SET status = 'running', stage = 'queued', attempt = j.attempt + 1, claimed_at = now(),
    heartbeat_at = now(), error = NULL, last_error = NULL,
    stage_times = jsonb_build_object('queued', now())
FROM chosen
WHERE j.id = chosen.id
RETURNING j.id, j.attempt, j.owner_user_id, j.created_at, j.claimed_at, chosen.pos,
          coalesce(j.pending_at, j.created_at), (SELECT n FROM running);

-- name: count_running
-- `owner_user_id IS NOT NULL` is always true (NOT NULL column); it names jobs_running_idx's
-- predicate, which the fenced writes below cannot use (sql/016_stage_plan.sql).
SELECT count(*) FROM imagen.jobs WHERE status = 'running' AND owner_user_id IS NOT NULL;

-- name: release_claim
-- Undo a claim whose forward failed: the attempt did not happen.
UPDATE imagen.jobs
SET status = 'pending', stage = NULL, attempt = attempt - 1, claimed_at = NULL, heartbeat_at = NULL
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running';

-- name: rescue_expired
-- A job still 'queued' never reached a worker (workers down, or Redis lost its messages):
-- it goes back to pending however many attempts it has, so an outage fails nothing.
WITH expired AS (
    SELECT id FROM imagen.jobs
    WHERE status = 'running' AND owner_user_id IS NOT NULL  -- names jobs_running_idx (count_running)
      AND heartbeat_at < now() - make_interval(secs => %(lease)s)
    ORDER BY heartbeat_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE imagen.jobs j
SET status = CASE WHEN j.attempt >= %(max_attempts)s AND j.stage IS DISTINCT FROM 'queued'
                  THEN 'failed' ELSE 'pending' END,
    error = CASE WHEN j.attempt >= %(max_attempts)s AND j.stage IS DISTINCT FROM 'queued'
        THEN format('gave up after %%s attempts: the job stopped making progress in stage %%s '
                    '(no heartbeat for %%s s)%%s', j.attempt, coalesce(j.stage, 'queued'), %(lease)s,
                    coalesce('; last error: ' || j.last_error, ''))
        ELSE j.error END,
    -- Back to pending: pickup counts from now, and the jobs_notify_pending trigger wakes the listeners.
    pending_at = CASE WHEN j.attempt >= %(max_attempts)s AND j.stage IS DISTINCT FROM 'queued'
                      THEN j.pending_at ELSE now() END,
    stage = NULL, heartbeat_at = NULL
FROM expired
WHERE j.id = expired.id
RETURNING j.id, j.status, j.attempt;

-- name: begin_stage
UPDATE imagen.jobs
SET stage = %(stage)s, heartbeat_at = now(),
    stage_times = stage_times || jsonb_build_object(%(stage)s::text, now())
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running'
RETURNING id, owner_user_id, prompt, params::text, attempt, created_at, claimed_at;

-- name: heartbeat_many
UPDATE imagen.jobs j SET heartbeat_at = now()
FROM unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS b(id, attempt)
WHERE j.id = b.id AND j.attempt = b.attempt AND j.status = 'running';

-- name: still_running
-- A read, no lock: which (id, attempt) pairs still hold their job.
SELECT j.id::text, j.attempt FROM imagen.jobs j
JOIN unnest(%(ids)s::uuid[], %(attempts)s::int[]) AS b(id, attempt) ON j.id = b.id AND j.attempt = b.attempt
WHERE j.status = 'running';

-- name: note_transient
UPDATE imagen.jobs SET last_error = %(error)s, heartbeat_at = now()
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running';

-- name: fail_job
UPDATE imagen.jobs SET status = 'failed', error = %(error)s, stage = NULL
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running';

-- name: complete_job
UPDATE imagen.jobs
SET status = 'done', image_id = %(image_id)s, stage = NULL, error = NULL, last_error = NULL,
    stage_times = stage_times || jsonb_build_object('done', now())
WHERE id = %(id)s AND attempt = %(attempt)s AND status = 'running';

-- name: job_state
SELECT status, attempt FROM imagen.jobs WHERE id = %(id)s;

-- name: get_job
SELECT * FROM imagen.jobs WHERE id = %(id)s;

-- name: cancel_job
-- Operator cancel: a running job stops at its next stage boundary (its fence fails there).
UPDATE imagen.jobs SET status = 'cancelled'
WHERE id = %(id)s AND status IN ('pending', 'running')
RETURNING status;

-- name: retry_job
-- Operator retry: the attempt count carries on; pickup counts from now (pending_at).
UPDATE imagen.jobs
SET status = 'pending', stage = NULL, error = NULL, last_error = NULL, image_id = NULL,
    claimed_at = NULL, heartbeat_at = NULL, finished_at = NULL, stage_times = '{}', pending_at = now()
WHERE id = %(id)s AND status IN ('failed', 'cancelled')
RETURNING status;

-- name: submit_job
-- Run as the service, or after `SET LOCAL ROLE authenticated` and the JWT claims (as the owner:
-- row level security applies, as for the UI).
INSERT INTO imagen.jobs (owner_user_id, prompt, params) VALUES (%(owner)s, %(prompt)s, %(params)s)
RETURNING id;

-- name: act_as_owner
-- PostgREST's JWT claims for the transaction (the role is set just before: SET LOCAL ROLE authenticated).
SELECT set_config('request.jwt.claims', %(claims)s, true);

-- name: become_owner_role
SET LOCAL ROLE authenticated;
