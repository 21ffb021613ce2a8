-- Who may do what: row level security and grants, the Supabase way.
--
-- Grants are checked before policies, so both are needed: the grants say which
-- statements and columns a role may use at all, the policies which rows.
-- `authenticated` (a signed-in UI user, through PostgREST) may read its own
-- jobs, images and usage, insert its own pending jobs (only the columns a user
-- chooses; the worker columns keep their defaults) and cancel its own pending
-- or running job. `anon` gets nothing, not even the schema. The workers
-- connect as the table owner or `service_role`, both of which bypass RLS.
-- `(select auth.uid())` is evaluated once per statement (an initPlan), not per row.

alter table imagen.images enable row level security;
alter table imagen.jobs enable row level security;
alter table imagen.usage enable row level security;

revoke all on all tables in schema imagen from public, anon, authenticated;
revoke all on all sequences in schema imagen from public, anon, authenticated;
revoke all on all functions in schema imagen from public, anon, authenticated;
revoke all on schema imagen from public, anon;
grant usage on schema imagen to authenticated, service_role;

grant all privileges on imagen.images, imagen.jobs, imagen.usage to service_role;
grant usage, select on all sequences in schema imagen to service_role;

grant select on imagen.jobs, imagen.images, imagen.usage to authenticated;
grant insert (id, owner_user_id, prompt, params) on imagen.jobs to authenticated;
grant update (status) on imagen.jobs to authenticated;

create policy jobs_select_own on imagen.jobs
    for select to authenticated
    using ((select auth.uid()) = owner_user_id);

create policy jobs_insert_own_pending on imagen.jobs
    for insert to authenticated
    with check ((select auth.uid()) = owner_user_id and status = 'pending');

-- The only update a user may make: cancel its own job while it can still be cancelled.
create policy jobs_cancel_own on imagen.jobs
    for update to authenticated
    using ((select auth.uid()) = owner_user_id and status in ('pending', 'running'))
    with check ((select auth.uid()) = owner_user_id and status = 'cancelled');

create policy images_select_own on imagen.images
    for select to authenticated
    using ((select auth.uid()) = owner_user_id);

create policy usage_select_own on imagen.usage
    for select to authenticated
    using ((select auth.uid()) = owner_user_id);

-- Supabase Realtime: stream job changes to the UI (each change is checked
-- against the subscriber's select policy). Plain PostgreSQL has no such
-- publication, and a FOR ALL TABLES publication already covers the table.
do $$
begin
    if exists (select 1 from pg_catalog.pg_publication where pubname = 'supabase_realtime')
        and not exists (
            select 1 from pg_catalog.pg_publication_tables
            where pubname = 'supabase_realtime' and schemaname = 'imagen' and tablename = 'jobs'
        )
    then
        alter publication supabase_realtime add table imagen.jobs;
    end if;
end
$$;
