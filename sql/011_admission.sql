-- Admission: idempotent submission (jobs.client_key) and per-owner daily quota overrides.
--
-- client_key: a key the UI chooses for one submission (a UUID it makes before the first
-- try), unique per owner. A retried INSERT with `on conflict (owner_user_id, client_key)
-- do nothing` (PostgREST: `Prefer: resolution=ignore-duplicates`, supabase-js `upsert(...,
-- { onConflict: 'owner_user_id,client_key', ignoreDuplicates: true })`) then creates no
-- second job. A plain unique constraint, not a partial index, so ON CONFLICT can name its
-- columns; rows without a key (null) never conflict, and another owner's identical key is
-- another row.
--
-- owner_quotas: the operator's per-owner overrides of IMAGEN_OWNER_DAILY_IMAGES and
-- IMAGEN_OWNER_DAILY_COST_USD (a null column keeps the default). Only service_role (and
-- the table owner) write it; an owner may read its own row, so the UI can show the limit.

alter table imagen.jobs add column client_key text
    constraint jobs_client_key_check check (char_length(client_key) between 1 and 200);
alter table imagen.jobs add constraint jobs_owner_client_key_key unique (owner_user_id, client_key);

grant insert (client_key) on imagen.jobs to authenticated;

create table imagen.owner_quotas (
    owner_user_id uuid primary key,
    daily_images int constraint owner_quotas_images_check check (daily_images >= 0),
    daily_cost_usd numeric(12, 6) constraint owner_quotas_cost_check check (daily_cost_usd >= 0),
    note text,
    updated_at timestamptz not null default now()
);

alter table imagen.owner_quotas enable row level security;
revoke all on imagen.owner_quotas from public, anon, authenticated;
grant all privileges on imagen.owner_quotas to service_role;
grant select on imagen.owner_quotas to authenticated;

create policy owner_quotas_select_own on imagen.owner_quotas
    for select to authenticated
    using ((select auth.uid()) = owner_user_id);

-- The quota check sums an owner's usage since midnight UTC: usage_owner_idx
-- (owner_user_id, created_at desc) from 003 already serves it.
