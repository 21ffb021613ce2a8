-- imagen.usage: one row per provider call (successful or not), for cost and quota reports.

create table imagen.usage (
    id bigint generated always as identity primary key,
    owner_user_id uuid,
    job_id uuid references imagen.jobs (id) on delete set null,
    backend text not null,
    model text not null,
    images int not null default 0,
    -- Token counts are null where the provider does not report them.
    input_tokens int,
    output_tokens int,
    image_output_tokens int,
    thought_tokens int,
    -- An estimate from the price table at the time of the call.
    cost_usd numeric(12, 6),
    latency_ms double precision not null default 0,
    ok boolean not null,
    error text,
    raw jsonb not null default '{}',
    created_at timestamptz not null default now()
);

create index usage_owner_idx on imagen.usage (owner_user_id, created_at desc);
create index usage_job_idx on imagen.usage (job_id);
