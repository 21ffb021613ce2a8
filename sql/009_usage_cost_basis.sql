-- imagen.usage.cost_basis: how each row's cost_usd was estimated, or why it could not be.
--
-- A null cost_usd used to mean "free", "unknown model" and "the provider reported
-- too little" alike. The estimate now says which: a priced row names the price
-- entry, its date and its source's quality ("prices.toml gpt-image-2 as of
-- 2026-11-30 (secondary source)"), an unpriced one starts with 'unpriced:' and
-- names the reason, so `imagen jobs stats` and an operator can find calls the
-- ledger cannot cost. Rows written before this migration keep a null basis.

alter table imagen.usage add column cost_basis text;

comment on column imagen.usage.cost_basis is
    'How cost_usd was estimated (price entry, as_of date, source quality), or ''unpriced: <why>'' when it is null';
