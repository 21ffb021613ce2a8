-- A job that becomes pending again wakes the listeners at once, and its pickup counts from then.
--
-- Before, only an INSERT notified: a job put back to pending by `imagen jobs retry`
-- (or by SQL) or by another listener's lease rescue waited for the next safety poll
-- (up to IMAGEN_POLL_INTERVAL, 5 s), and its pickup (claimed_at - created_at) counted
-- every earlier attempt and the time it spent failed, so `jobs show`, `jobs stats` and
-- the listener's pickup histogram were inflated by retries.
--
-- `pending_at` is when the job last became pending again: set by a retry (from a
-- terminal state) and by the rescue of an expired lease; null for a job that has been
-- pending only since it was created, so pickup is claimed_at - coalesce(pending_at,
-- created_at). A claim that is put back because its forward to Redis failed keeps
-- pending_at (and does not notify): the job waited all along, and a notification
-- would wake the listener straight into the same outage.
--
-- Nullable with no default: adding it rewrites nothing, and inserts are unchanged.

alter table imagen.jobs add column pending_at timestamptz;

-- A retry, by `imagen jobs retry` or by hand: back to pending from a terminal state.
create function imagen.jobs_stamp_pending() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    new.pending_at := pg_catalog.now();
    return new;
end
$$;

create trigger jobs_stamp_pending
    before update on imagen.jobs
    for each row
    when (new.status = 'pending' and old.status in ('done', 'failed', 'cancelled'))
    execute function imagen.jobs_stamp_pending();

-- Wake the listeners when a job became pending again (a retry, or a rescue, which sets
-- pending_at itself). pg_notify folds identical notifications of one transaction into
-- one, so a rescue of many rows sends a single wake-up, delivered at commit.
create function imagen.jobs_notify_pending() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    perform pg_catalog.pg_notify('imagen_jobs', 'pending');
    return null;
end
$$;

create trigger jobs_notify_pending
    after update on imagen.jobs
    for each row
    when (new.status = 'pending' and new.pending_at is distinct from old.pending_at)
    execute function imagen.jobs_notify_pending();

revoke all on function imagen.jobs_stamp_pending() from public, anon, authenticated;
revoke all on function imagen.jobs_notify_pending() from public, anon, authenticated;
