-- The monthly spend reports show our computed total, fal's billed total and the difference.
--
--   cost_micros               the ledger's cost: fal's figure once billed, else ours
--   computed_micros           our own figure for every completed generation (what the
--                             ledger priced, before fal's bill replaced it)
--   billed_generations        completed generations fal's billing events priced
--   fal_billed_micros         fal's figure for those (null: none billed yet)
--   billed_difference_micros  fal_billed_micros minus our own figure for the same
--                             generations (positive: fal charged more; null: none billed)
--
-- The rollups carry the sums the report tables are made of (billed_computed_micros: our
-- figure for the billed generations only). Rollups computed before this migration are
-- marked unsettled, so the next refresh of their month (the hourly one, or materializing
-- a finalized month's partition again) reads them from the ledger again.

alter table spend_rollup_daily
  add column computed_micros bigint not null default 0,
  add column billed_generations integer not null default 0,
  add column fal_billed_micros bigint not null default 0,
  add column billed_computed_micros bigint not null default 0;

alter table spend_rollup_daily_batch
  add column computed_micros bigint not null default 0,
  add column billed_generations integer not null default 0,
  add column fal_billed_micros bigint not null default 0,
  add column billed_computed_micros bigint not null default 0;

alter table spend_monthly_by_user
  add column computed_micros bigint not null default 0,
  add column billed_generations integer not null default 0;

alter table spend_monthly_by_endpoint
  add column computed_micros bigint not null default 0,
  add column billed_generations integer not null default 0;

alter table spend_monthly_by_batch
  add column computed_micros bigint not null default 0,
  add column billed_generations integer not null default 0;

alter table spend_daily
  add column computed_micros bigint not null default 0,
  add column billed_generations integer not null default 0,
  add column fal_billed_micros bigint,
  add column billed_difference_micros bigint;

alter table spend_report_months
  add column computed_micros bigint not null default 0,
  add column billed_generations bigint not null default 0,
  add column fal_billed_micros bigint,
  add column billed_difference_micros bigint;

update spend_rollup_days set settled = false;
