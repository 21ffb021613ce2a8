-- imagen.jobs.params: bounded, like the prompt (docs/security.md R17).
--
-- A signed-in user writes params, and nothing bounded its size: a row with megabytes of
-- params would be read, parsed and held by the worker that claims it (and by `imagen web`
-- and `imagen jobs show`), only to fail on its unknown keys. Every key a job may use fits
-- in far less: the longest, negative_prompt, is at most 2000 characters (imagen/params.py),
-- under 12,000 bytes of JSON text even when every character needs a \uXXXX escape.
--
-- NOT VALID: new and updated rows are checked; rows already in the table are not scanned
-- (none of them can have been a job anyway), so the migration is quick on any table.

alter table imagen.jobs add constraint jobs_params_size_check
    check (octet_length(params::text) <= 16384) not valid;
