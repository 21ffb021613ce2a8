-- A stage's fenced write must find its job by primary key, whatever the statistics say.
--
-- Every stage write is fenced on `id = ... AND attempt = ... AND status = 'running'`. That
-- condition implies jobs_running_idx's predicate, and when the last ANALYZE saw no running job
-- (a quiet moment: autovacuum's, or the bench's VACUUM ANALYZE before a burst) that partial index
-- looks like a one-page index, cheaper than jobs_pkey's descent. The planner then chose it for
-- the stage start, the chained end, the heartbeat and every other fenced write, generic and
-- custom plans alike: each one walked every running row (and the dead entries left since the last
-- vacuum) and fetched its heap row to compare ids. Per job that grows with the jobs in flight:
-- in `imagen bench --scale` at 3,000 owners the stage start read 170-180 buffer blocks instead of
-- 30 and the chained end 240 instead of 80 (auto_explain: "Index Scan using jobs_running_idx ...
-- Rows Removed by Filter: 245"), and a host with hundreds of slow provider calls in flight would
-- pay that on every write of every job.
--
-- jobs_running_idx now names owner_user_id in its predicate, as sql/015 did for jobs_pending_idx:
-- the fenced writes, which have no owner condition, cannot use it and take jobs_pkey; the
-- queries that want every running row (the in-flight count, the lease rescue, the operator's
-- counts) say `owner_user_id IS NOT NULL`, always true (the column is NOT NULL), to use it.
-- Plain build, as in 005: about a second per million rows, writes blocked meanwhile.

drop index imagen.jobs_running_idx;
create index jobs_running_idx on imagen.jobs (claimed_at)
    where status = 'running' and owner_user_id is not null;
