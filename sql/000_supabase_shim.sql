-- The parts of Supabase that imagen's migrations rely on, for plain PostgreSQL.
--
-- Not a numbered migration: `imagen db migrate` runs this first, and only when
-- auth.uid() does not exist (a Supabase database already has all of it). It
-- mirrors Supabase: the API roles anon, authenticated and service_role (which
-- bypasses RLS), and auth.uid() / auth.role() / auth.jwt() reading the JWT
-- claims PostgREST puts in `request.jwt.claims` (or the older
-- `request.jwt.claim.*` settings). The bodies are Supabase's current ones: a
-- setting that is empty (a SET LOCAL from an earlier transaction reverts to '')
-- counts as absent instead of failing the ::jsonb cast.

do $$
declare
    role_name text;
begin
    foreach role_name in array array['anon', 'authenticated', 'service_role'] loop
        if not exists (select 1 from pg_catalog.pg_roles where rolname = role_name) then
            begin
                if role_name = 'service_role' then
                    execute pg_catalog.format('create role %I nologin noinherit bypassrls', role_name);
                else
                    execute pg_catalog.format('create role %I nologin noinherit', role_name);
                end if;
            exception when duplicate_object or unique_violation then
                -- Roles are cluster-wide: a migrator in another database created it first.
                null;
            end;
        end if;
    end loop;
end
$$;

-- `SET ROLE authenticated` (what PostgREST does, and what the tests do) needs
-- membership unless the migrating user is a superuser.
do $$
declare
    role_name text;
begin
    if not (select rolsuper from pg_catalog.pg_roles where rolname = current_user) then
        foreach role_name in array array['anon', 'authenticated', 'service_role'] loop
            if not pg_catalog.pg_has_role(current_user, role_name, 'member') then
                execute pg_catalog.format('grant %I to %I', role_name, current_user);
            end if;
        end loop;
    end if;
end
$$;

create schema if not exists auth;

create or replace function auth.uid() returns uuid
    language sql stable
as $$
    select coalesce(
        nullif(current_setting('request.jwt.claim.sub', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
    )::uuid
$$;

create or replace function auth.role() returns text
    language sql stable
as $$
    select coalesce(
        nullif(current_setting('request.jwt.claim.role', true), ''),
        (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
    )::text
$$;

create or replace function auth.jwt() returns jsonb
    language sql stable
as $$
    select coalesce(
        nullif(current_setting('request.jwt.claim', true), ''),
        nullif(current_setting('request.jwt.claims', true), '')
    )::jsonb
$$;

grant usage on schema auth to anon, authenticated, service_role;
grant execute on function auth.uid(), auth.role(), auth.jwt() to anon, authenticated, service_role;
