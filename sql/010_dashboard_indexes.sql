-- Indexes for the operator dashboard (`imagen web`, issue 19) and `imagen jobs ls/stats`.
--
-- Without them, the newest jobs (the dashboard's index page, `imagen jobs ls`) are
-- a sort of the whole table, the per-status counts a scan of it, and "jobs that
-- finished in the last hour" (the health charts, `imagen jobs stats`) another:
-- hundreds of milliseconds each on 1,000,000 rows, every second a browser polls.
--
-- - jobs_created_idx: the newest jobs, any status (ORDER BY created_at DESC, id DESC LIMIT n).
-- - jobs_status_created_idx: one terminal status's newest jobs, and the dashboard's counts
--   of them (index-only scans, capped: docs/operations.md). Terminal statuses only: pending
--   and running jobs have their partial indexes (002, 005), and an index covering pending
--   rows would tempt the listener's claim away from jobs_pending_idx when the statistics are
--   stale (a burst on a table of done jobs; tests/integration/test_stages.py).
-- - jobs_finished_idx: jobs that finished since a moment (throughput and latency charts,
--   the last claim among them).
--
-- Cost: every INSERT and every status change writes these entries too (status is
-- already an indexed column through the partial indexes' predicates, so a status
-- change was never HOT; stage changes and heartbeats, which touch none of these
-- columns, stay HOT). Plain builds, as in 005: a migration runs in a transaction,
-- and the build blocks writes for about a second per million rows.

create index jobs_created_idx on imagen.jobs (created_at desc, id desc);
create index jobs_status_created_idx on imagen.jobs (status, created_at desc, id desc)
    where status in ('done', 'failed', 'cancelled');
create index jobs_finished_idx on imagen.jobs (finished_at) where finished_at is not null;
