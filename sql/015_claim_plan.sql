-- The claim's plan must not depend on fresh statistics.
--
-- After a burst of pending jobs on a table whose statistics (the last ANALYZE) show none, both
-- partial indexes on pending rows look like one-row indexes, and the planner could take the
-- smaller one, jobs_pending_idx (owner_user_id, fair_round), read every pending row through it and
-- sort them for the claim's ORDER BY: 90-320 ms a claim at 1,000 owners x 100 jobs, 40,000-100,000
-- buffer blocks, until the next ANALYZE (`imagen bench --scale`, docs/benchmarks.md). In production
-- autovacuum analyzes a table of 1,000,000 jobs only after about 100,000 changed rows, and then
-- within a minute: such a burst would be claimed that slowly for up to a minute.
--
-- jobs_pending_idx now names owner_user_id in its predicate. A query with an owner condition
-- (`owner_user_id = ...` or `= ANY(...)` implies IS NOT NULL: the trigger's owner lookup,
-- admission's per-owner counts, cancels by owner) still uses it; the claim, which has none, can
-- only take jobs_claim_idx, in order, and reads the rows it takes. The operator's counts of pending
-- jobs name `fair_round IS NOT NULL` (always true, jobs_fair_round_check) to use jobs_claim_idx.
-- Plain build, as in 005 and 010: about a second per million pending rows, writes blocked meanwhile.

drop index imagen.jobs_pending_idx;
create index jobs_pending_idx on imagen.jobs (owner_user_id, fair_round)
    where status = 'pending' and owner_user_id is not null;
