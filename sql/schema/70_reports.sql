-- Monthly spend reports: a daily rollup the reports are summed from, the report tables
-- analysts query, and the state of each month (open, or final once finalized).
--
-- A generation belongs to the UTC day and month of its created_at, whatever time it
-- finishes: a clip submitted at 23:59:59.999 UTC on the 31st is spent in that month, even
-- when its completion (and so its price) arrives on the 1st. Money is micro-dollars;
-- cents are the micro-dollar sum rounded once, half up (rq_micros_to_cents), never a sum
-- of per-row cents.
--
-- Nothing here touches the ledger's write path: no trigger and no new index on
-- generations. The rollups are recomputed per UTC day by the reports code
-- (renderqueue_pipeline/reports/), which finds a day's rows through the seed's
-- (user_id, created_at desc) index (a skip scan over users, PostgreSQL 18) and keeps days
-- that can no longer change.

-- The monthly reports show our computed total, fal's billed total and the difference.
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
-- figure for the billed generations only).

-- The rollups the reports are summed from: per UTC day, user and endpoint; and per UTC
-- day and batch (batch_id null: generations submitted one at a time, outside any batch).
-- Counts by status; seconds and micro-dollars of completed generations; estimates of open
-- ones; unpriced = completed with no price behind the cost.
create table spend_rollup_daily (
  day date not null,
  user_id bigint not null,
  endpoint text not null,
  generations integer not null,
  completed integer not null,
  failed integer not null,
  canceled integer not null,
  open integer not null,
  unpriced integer not null,
  billed_seconds numeric not null,
  cost_micros bigint not null,
  open_estimate_micros bigint not null,
  computed_micros bigint not null default 0,
  billed_generations integer not null default 0,
  fal_billed_micros bigint not null default 0,
  billed_computed_micros bigint not null default 0,
  primary key (day, user_id, endpoint)
);

create table spend_rollup_daily_batch (
  day date not null,
  batch_id bigint,
  generations integer not null,
  completed integer not null,
  failed integer not null,
  canceled integer not null,
  open integer not null,
  unpriced integer not null,
  billed_seconds numeric not null,
  cost_micros bigint not null,
  open_estimate_micros bigint not null,
  submit_estimate_micros bigint not null,
  computed_micros bigint not null default 0,
  billed_generations integer not null default 0,
  fal_billed_micros bigint not null default 0,
  billed_computed_micros bigint not null default 0
);
create unique index spend_rollup_daily_batch_key
  on spend_rollup_daily_batch (day, batch_id) nulls not distinct;

-- When each day's rollup was computed, and whether it can still change on its own.
-- A day is settled once it has ended (plus a short settling period) and had no open
-- generation when computed; refreshes of an open month reuse settled days unless a new
-- row or event touches them; finalizing (or rebuilding) a month reads every day again.
-- A writer that changes money outside record_events marks its days unsettled
-- (renderqueue_pipeline.reports.mark_days_unsettled).
create table spend_rollup_days (
  day date primary key,
  computed_at timestamptz not null,
  generations integer not null,
  open integer not null,
  settled boolean not null,
  -- what the computing refresh saw: its snapshot's start and the newest ids
  snapshot_at timestamptz not null,
  max_generation_id bigint not null,
  max_event_id bigint not null
);

-- The month's state: 'open' while it is refreshed, 'final' once finalized.
create table spend_report_months (
  month date primary key check (extract(day from month) = 1),
  state text not null check (state in ('open', 'final')),
  computed_at timestamptz not null,
  finalized_at timestamptz,
  generations bigint not null,
  cost_micros bigint not null,
  open_estimate_micros bigint not null,
  -- what the refresh saw: its snapshot's start and the newest generation id; the checks
  -- compare only keys with no change since (see docs/reports.md, "Checks")
  snapshot_at timestamptz not null,
  max_generation_id bigint not null,
  computed_micros bigint not null default 0,
  billed_generations bigint not null default 0,
  fal_billed_micros bigint,
  billed_difference_micros bigint
);

-- The monthly report rows in one table, keyed by (month, dimension, key), written by one
-- statement (sql/queries/reports.sql, report_rows_insert: GROUPING SETS over the rollups).
-- The key is typed, not text: `user_id` for 'user' rows, `endpoint` for 'endpoint' rows,
-- `day` and `endpoint` for 'day' rows, `batch_id` (null: generations submitted one at a
-- time) and its `source` for 'batch' rows; the key columns another dimension does not use
-- are null. The reconciliation with fal's bill (spend domain) fills fal_billed_micros and
-- billed_difference_micros; they stay null until then. A figure is one column here, one
-- expression in report_rows_insert and one entry in renderqueue_pipeline/reports/figures.py
-- (docs/reports.md, "Adding a figure").
create table spend_report_rows (
  month date not null check (extract(day from month) = 1),
  dimension text not null check (dimension in ('user', 'endpoint', 'batch', 'day')),
  day date,
  user_id bigint,
  endpoint text,
  batch_id bigint,
  source text,
  generations integer not null,
  completed integer not null,
  failed integer not null,
  canceled integer not null,
  open integer not null,
  unpriced integer not null,
  billed_seconds numeric not null,
  cost_micros bigint not null,
  cost_cents bigint not null,
  micros_per_completed_second numeric,
  open_estimate_micros bigint not null,
  -- batch rows only: the estimates recorded at submit, and how far the spend ran from them
  submit_estimate_micros bigint,
  cost_minus_estimate_micros bigint,
  computed_micros bigint not null,
  billed_generations integer not null,
  fal_billed_micros bigint,
  billed_difference_micros bigint,
  computed_at timestamptz not null,
  check ((dimension = 'user') = (user_id is not null)),
  check ((dimension = 'day') = (day is not null)),
  check ((dimension = 'batch') = (submit_estimate_micros is not null)),
  check (dimension in ('endpoint', 'day') = (endpoint is not null))
);
create unique index spend_report_rows_key
  on spend_report_rows (month, dimension, day, user_id, endpoint, batch_id) nulls not distinct;

-- The analyst-facing names: the columns and their order are the report files' columns
-- (renderqueue_pipeline/reports/figures.py REPORT_COLUMNS; a test compares them). A new
-- figure is appended at the end (`create or replace view` may add columns there).
create view spend_monthly_by_user as
select month, user_id, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents, micros_per_completed_second,
       open_estimate_micros, fal_billed_micros, billed_difference_micros, computed_at,
       computed_micros, billed_generations
from spend_report_rows where dimension = 'user';

create view spend_monthly_by_endpoint as
select month, endpoint, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents, micros_per_completed_second,
       open_estimate_micros, fal_billed_micros, billed_difference_micros, computed_at,
       computed_micros, billed_generations
from spend_report_rows where dimension = 'endpoint';

create view spend_monthly_by_batch as
select month, batch_id, source, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents, micros_per_completed_second,
       open_estimate_micros, submit_estimate_micros, cost_minus_estimate_micros,
       fal_billed_micros, billed_difference_micros, computed_at, computed_micros,
       billed_generations
from spend_report_rows where dimension = 'batch';

create view spend_daily as
select day, month, endpoint, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents, open_estimate_micros, computed_at,
       computed_micros, billed_generations, fal_billed_micros, billed_difference_micros
from spend_report_rows where dimension = 'day';

comment on table spend_report_rows is
  'Monthly spend report rows by user, endpoint, batch and day; read them through the views '
  'spend_monthly_by_user, spend_monthly_by_endpoint, spend_monthly_by_batch and spend_daily.';

-- A closed month's report is rebuilt when the ledger behind it changes (issue 18, finding 4).
--
-- A month is finalized once (06:00 UTC on the 1st), but its rows keep changing after that:
-- the reconciler settles rows up to 24 h later, fal retries webhooks for 2 h, billing is
-- re-applied to the last 3 days every morning, late payloads arrive, and anyone may run
-- raw SQL. Every change to a generation of a month that has ended (by the ledger's clock,
-- rq_now()) is recorded here IN THE SAME TRANSACTION, by triggers, so every writer is
-- covered: our functions, the billing apply (fal's billed figures live on generations),
-- the seed article's raw statements, a DELETE, and a batch item whose estimate or batch
-- changes under a generation (the by-batch report reads both).
--
-- `changes` counts the changed rows; `rebuilt_changes` is the count the last full
-- rebuild of the month saw in its snapshot. The month is changed (dirty) while
-- changes > rebuilt_changes: a write that commits after a rebuild's snapshot has a
-- higher count, so it is never lost. The reports' sensor rebuilds dirty months
-- (defs/reports/sensors.py); report_matches_ledger fails while the report differs.
--
-- Only months that have ended are recorded: the current month's hot path (webhooks,
-- submits) pays one comparison per row (the triggers' WHEN clause) and nothing else.

create table spend_report_changes (
  month date primary key check (extract(day from month) = 1),
  changes bigint not null default 0,
  first_changed_at timestamptz not null,   -- first change since the last rebuild
  last_changed_at timestamptz not null,
  rebuilt_changes bigint not null default 0,
  rebuilt_at timestamptz
);
