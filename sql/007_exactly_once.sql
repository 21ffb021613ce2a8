-- Exactly-once bookkeeping beside the job row: one usage row per provider call, and no image
-- for a job that is not done.
--
-- One usage row per provider call, never zero and never two.
--
-- Every provider call gets an id before it is made (imagen.pipeline), and every
-- writer of its row (the stage's own INSERT, the chained statement that ends the
-- job, the replay of the local spool) inserts with ON CONFLICT (call_id) DO
-- NOTHING: a write whose reply was lost, or a spooled record replayed twice,
-- cannot add a second row.
--
-- Rows written before this migration keep call_id NULL (UNIQUE allows any
-- number of NULLs): they were never given one, and inventing ids for them would
-- claim a check that never happened. The column and the default are added in
-- two statements so that PostgreSQL does not rewrite the table to fill it; the
-- unique index reads it once (about a second per million rows, writes blocked).
-- The default covers writers that name no call id (an older worker during a
-- rolling upgrade): they get a fresh one, as before, no dedup.
--
-- written_at is when the row reached the database (clock_timestamp(), not the
-- transaction's start): with created_at (when the provider answered, on the
-- worker's clock) it measures the window in which a SIGKILL loses a row, and it
-- shows the rows replayed late from a worker's spool. NULL for older rows.

alter table imagen.usage add column call_id uuid;
alter table imagen.usage alter column call_id set default gen_random_uuid();
alter table imagen.usage add constraint usage_call_id_key unique (call_id);

alter table imagen.usage add column written_at timestamptz;
alter table imagen.usage alter column written_at set default clock_timestamp();

-- A job that is not done keeps no image, whatever failed on the way there (a lost
-- finalize message, a rescue at the maximum attempts, a worker killed between its
-- upload and its images row): the listener's sweep visits every job that ended
-- failed or cancelled once, under its row lock removes its images row and the
-- objects at its object path, and stamps image_swept_at. A retry that ends the job
-- again stamps a newer finished_at, so the job is swept again. The partial index
-- holds only jobs still to sweep, so the sweep's poll reads nothing else. Jobs that
-- ended before this migration are visited once too (a batch per poll): some of
-- them kept their image through the faults this sweep is for.
alter table imagen.jobs add column image_swept_at timestamptz;
create index jobs_unswept_idx on imagen.jobs (finished_at)
    where status in ('failed', 'cancelled') and (image_swept_at is null or image_swept_at < finished_at);
