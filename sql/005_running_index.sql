-- The running-jobs index keyed on a column a running job never changes.
--
-- 002 keyed it on heartbeat_at, which every stage start, heartbeat and noted
-- error rewrites: none of those updates could be HOT, each left a new index
-- entry and a dead one behind, and the listener's in-flight count (an index
-- scan of the running rows, heap fetches included) slowed from under 1 ms to
-- over 5 ms per count within 30,000 jobs as the dead entries piled up until a
-- vacuum. Keyed on claimed_at (set by the claim, cleared only by a release),
-- those updates touch no indexed column and are HOT wherever the page has
-- room. The lease rescue reads the running rows through it and filters on
-- heartbeat_at: at most the in-flight cap of them.
--
-- A plain (not CONCURRENTLY) build: migrations run in a transaction. It reads
-- the whole table once and blocks writes to it meanwhile, about a second per
-- million rows.

drop index imagen.jobs_running_idx;
create index jobs_running_idx on imagen.jobs (claimed_at) where status = 'running';
