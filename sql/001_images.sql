-- imagen.images: one row per stored image, from a job or from a CLI run.

create schema if not exists imagen;

create table imagen.images (
    id uuid primary key default gen_random_uuid(),
    -- Null for CLI runs with no IMAGEN_OWNER_USER_ID.
    owner_user_id uuid,
    -- Unique so a job yields at most one image however often its stages run;
    -- no foreign key, so images survive their job row.
    job_id uuid unique,
    bucket text not null,
    path text not null,
    mime text not null,
    width int not null,
    height int not null,
    bytes int not null,
    prompt text not null,
    backend text not null,
    model text,
    params jsonb not null default '{}',
    created_at timestamptz not null default now(),
    constraint images_bucket_path_key unique (bucket, path)
);

create index images_owner_idx on imagen.images (owner_user_id, created_at desc);
