-- imagen.jobs: the job row, the contract between the UI, the listener and the actors.
--
-- The UI inserts pending rows (as `authenticated`, see 004_security.sql); the
-- listener claims them fairly (each owner's oldest first) and the actors move them to a
-- terminal state. Every write a stage makes is fenced on (status, attempt).

create table imagen.jobs (
    id uuid primary key default gen_random_uuid(),
    owner_user_id uuid not null default auth.uid(),
    -- Not blank: btrim() alone strips only spaces, so tabs and line breaks are named too.
    prompt text not null
        constraint jobs_prompt_check
        check (btrim(prompt, E' \t\n\r\f\x0b') <> '' and char_length(prompt) <= 4000),
    params jsonb not null default '{}'
        constraint jobs_params_check check (jsonb_typeof(params) = 'object'),
    status text not null default 'pending'
        constraint jobs_status_check
        check (status in ('pending', 'running', 'done', 'failed', 'cancelled')),
    -- Informational: where a running job is.
    stage text
        constraint jobs_stage_check check (stage in ('queued', 'generating', 'syncing', 'finalizing')),
    -- Incremented by each claim; the fencing token every stage's write checks.
    attempt int not null default 0,
    error text,
    -- The latest transient error while the job is being retried.
    last_error text,
    image_id uuid references imagen.images (id) on delete set null,
    -- When each stage started, e.g. {"generating": "2026-01-01T00:00:00Z"}.
    stage_times jsonb not null default '{}',
    created_at timestamptz not null default now(),
    claimed_at timestamptz,
    heartbeat_at timestamptz,
    finished_at timestamptz,
    updated_at timestamptz not null default now()
);

-- The claim queue, small because only pending rows are in it. Claim order interleaves
-- owners (each owner's oldest job first), so the listener walks it per owner: a loose
-- index scan over owner_user_id, then each owner's rows in (created_at, id) order.
create index jobs_pending_idx on imagen.jobs (owner_user_id, created_at, id) where status = 'pending';
-- An owner's jobs, newest first (the UI's list, and the RLS predicate).
create index jobs_owner_idx on imagen.jobs (owner_user_id, created_at desc);
-- Lease rescue (oldest heartbeat first) and the in-flight count.
create index jobs_running_idx on imagen.jobs (heartbeat_at) where status = 'running';
-- The foreign key's referencing side, so deleting an image does not scan jobs.
create index jobs_image_idx on imagen.jobs (image_id) where image_id is not null;

create function imagen.jobs_before_update() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    new.updated_at := pg_catalog.now();
    if new.status in ('done', 'failed', 'cancelled') and new.status is distinct from old.status then
        new.finished_at := coalesce(new.finished_at, pg_catalog.now());
        if new.status = 'cancelled' then
            new.stage := null;
        end if;
    end if;
    return new;
end
$$;

create trigger jobs_before_update
    before update on imagen.jobs
    for each row execute function imagen.jobs_before_update();

-- A wake-up signal only: the listener drains the whole backlog on any
-- notification (and on its safety poll), so one per statement is enough and a
-- 10,000-row INSERT costs one notification. NOTIFY is delivered at commit.
create function imagen.jobs_notify_insert() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    perform pg_catalog.pg_notify('imagen_jobs', 'insert');
    return null;
end
$$;

create trigger jobs_notify_insert
    after insert on imagen.jobs
    for each statement execute function imagen.jobs_notify_insert();
