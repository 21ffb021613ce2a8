-- ---- section: migrations - the migrator's bookkeeping (imagen/db.py) ----
-- imagen.schema_migrations records each applied migration with its file's sha256; the migrator
-- refuses to go on when an applied file has changed since.

-- name: create_schema_migrations
-- Run before the first migration, under the migrators' advisory lock; several statements at once.
create schema if not exists imagen;
create table if not exists imagen.schema_migrations (
    version text primary key,
    name text not null,
    checksum text not null,
    applied_at timestamptz not null default now()
);
alter table imagen.schema_migrations enable row level security;
revoke all on imagen.schema_migrations from public;

-- name: schema_migrations_exists
select to_regclass('imagen.schema_migrations') is not null;

-- name: recorded_migrations
select version, name, checksum, applied_at from imagen.schema_migrations;

-- name: record_migration
insert into imagen.schema_migrations (version, name, checksum, applied_at)
values (%(version)s, %(name)s, %(checksum)s, now());
