-- Spend truth: fal's own bill, request by request, beside the ledger's figure (the
-- billing check; rq_nanos_to_micros is in sql/functions/billing.sql).
--
-- fal reports what it billed through its Platform API (GET /v1/models/billing-events):
-- one record per billed request with output units, unit price, discount and the cost in
-- nano-dollars. We keep those records as fal sent them (fal_billing_events), keep fal's
-- figure per generation beside our own (generations.fal_billed_*), and classify every
-- request of a day (billing_reconciliation).
--
-- Rounding rule, nano-USD -> micro-USD: a request's billing events are summed in
-- nano-dollars first, then rounded once, half up: micros = (nanos + 500) / 1000.

-- fal's billing events as loaded, one row per event (a request could be billed twice; the
-- reconciliation sums per request). Loaded one UTC day at a time, replacing that day.
create table fal_billing_events (
  request_id text not null,
  endpoint text not null,
  billed_at timestamptz not null,          -- fal's `timestamp`
  output_units numeric not null,           -- seconds of video for per-second endpoints
  unit_price numeric not null,             -- USD per unit, as fal sent it
  percent_discount numeric,                -- null: no discount
  cost_nano_usd bigint not null,           -- fal's cost_estimate_nano_usd
  loaded_at timestamptz not null default rq_now()
);
create index fal_billing_events_billed_at_idx on fal_billing_events (billed_at);
create index fal_billing_events_request_idx on fal_billing_events (request_id);

-- One row per request per day that needs a look (every outcome but 'matched' and
-- 'no_charge', which are counted in billing_reconciliation_days; a matched generation
-- carries fal's figure on its own row). day = the generation's UTC creation day, or fal's
-- billing day for a request the ledger does not know.
create table billing_reconciliation (
  day date not null,
  request_id text not null,
  endpoint text not null,
  outcome text not null check (outcome in (
    'matched', 'amount_differs', 'billed_not_completed', 'not_billed', 'awaiting_billing',
    'unknown_to_ledger')),
  reason text,
  ledger_status text,
  our_micros bigint,
  fal_micros bigint,
  fal_nano_usd bigint,
  our_seconds numeric,
  fal_units numeric,
  our_micros_per_second bigint,
  fal_micros_per_unit numeric,
  percent_discount numeric,
  batch_item_id bigint,
  created_at timestamptz,
  billed_at timestamptz,
  computed_at timestamptz not null default now(),
  primary key (day, request_id)
);
create index billing_reconciliation_outcome_idx on billing_reconciliation (outcome, day);

-- Per day and outcome: counts and money of every request (including 'matched', and
-- 'no_charge': failed, canceled or open generations fal did not bill, which is right).
create table billing_reconciliation_days (
  day date not null,
  outcome text not null,
  requests bigint not null,
  our_micros bigint not null,
  fal_micros bigint not null,
  computed_at timestamptz not null default now(),
  primary key (day, outcome)
);
