-- Job ids are the server's, and an image belongs to its job (and so its owner) for good.
--
-- A signed-in user inserts job rows, so everything in them is attacker-controlled
-- (issue 14). 004 let `authenticated` insert `id`: a user could reuse the id of a
-- pruned job (it is in every object path and signed URL) and be handed another
-- owner's images row, and a 23505 on a chosen id told whether another owner's job
-- exists. Now:
--
-- * `authenticated` may no longer name `id` in an INSERT (the grant is per column,
--   so naming it fails with "permission denied" before any uniqueness check, whoever
--   owns the id). PostgREST names only the columns in the JSON body, so the UI's
--   inserts are unchanged.
-- * A BEFORE INSERT trigger gives a fresh id to every row inserted by a role that
--   row level security applies to, in case a later grant (Supabase's "grant all on
--   all tables in schema ..." recipe) gives the column back. The workers, the
--   migrations and `service_role` bypass RLS and keep the id they give.
-- * `imagen.images.job_id` references the job. Deleting a job (`imagen jobs prune`)
--   detaches its image (job_id set to null; the row, its owner and its object stay,
--   as before), so no later job with the same id can ever pick that row up.

revoke insert on imagen.jobs from authenticated;
grant insert (owner_user_id, prompt, params) on imagen.jobs to authenticated;

create function imagen.jobs_server_id() returns trigger
    language plpgsql
    set search_path = ''
as $$
begin
    new.id := pg_catalog.gen_random_uuid();
    return new;
end
$$;

revoke all on function imagen.jobs_server_id() from public, anon, authenticated;

-- The WHEN clause keeps the workers' and the bench's inserts free of a PL/pgSQL call.
create trigger jobs_server_id
    before insert on imagen.jobs
    for each row
    when (pg_catalog.row_security_active('imagen.jobs'::pg_catalog.regclass))
    execute function imagen.jobs_server_id();

-- Before this migration an id could be reused: a job may have been linked to another
-- owner's image, and an image may point at a job that is not its owner's, or at a job
-- that no longer exists (pruned). Undo such links first; each image keeps its owner.
update imagen.jobs j
set image_id = null
from imagen.images i
where i.id = j.image_id and i.owner_user_id is distinct from j.owner_user_id;

update imagen.images i
set job_id = null
where i.job_id is not null
  and not exists (
      select 1 from imagen.jobs j where j.id = i.job_id and j.owner_user_id = i.owner_user_id
  );

alter table imagen.images
    add constraint images_job_id_fkey
    foreign key (job_id) references imagen.jobs (id) on delete set null;
