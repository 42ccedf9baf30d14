-- The ledger's tables around the seed's: prices with effective dates, batches and their
-- items (intent records), the columns added to `generations` (exact money, cancellation,
-- archive state), the raw event inbox, budgets and the monthly spend tables. Columns added
-- to `generations` all have defaults, so the seed article's own INSERT and UPDATE
-- statements keep working unchanged. The rules over these tables are in
-- 003_state_machine.sql; the seeded prices in 004_prices.sql.

-- Prices are data: one row per endpoint (and resolution / audio where the price depends on
-- them), valid from `effective_from` until a newer row for the same key takes over.
-- cost = base_micros + round(max(seconds - base_seconds, 0) * micros_per_second)
create table prices (
  id bigserial primary key,
  endpoint text not null,
  resolution text,                  -- null: the price does not depend on resolution
  with_audio boolean,               -- null: the price does not depend on audio
  micros_per_second bigint not null check (micros_per_second >= 0),
  base_micros bigint not null default 0 check (base_micros >= 0),
  base_seconds numeric not null default 0 check (base_seconds >= 0),
  default_seconds numeric not null check (default_seconds > 0),
  default_resolution text,          -- what the model renders when the request names none
  -- Where the endpoint's documented output states the clip's length (a JSON path such as
  -- {video,duration}); null when fal documents no duration, as for Seedance. The ledger
  -- reads no output field fal does not document: without a path, a completion is priced
  -- from the requested (or default) seconds.
  output_seconds_path text[],
  effective_from timestamptz not null,
  price_version text not null,
  source text not null,
  unique nulls not distinct (endpoint, resolution, with_audio, effective_from)
);
create index prices_endpoint_idx on prices (endpoint, effective_from desc);

-- Batches and their items. An item is the intent record of rule 1: written before fal is
-- called, it becomes `submitted` (with the request_id) in the transaction that inserts the
-- generation row. An item left `pending` past a deadline is an "unknown outcome".
create table batches (
  id bigserial primary key,
  source text not null,
  content_version text not null default '',
  endpoint text,
  default_user_id bigint,
  max_cost_micros bigint check (max_cost_micros >= 0),
  status text not null default 'open' check (status in ('open', 'done', 'failed')),
  created_at timestamptz not null default now(),
  finished_at timestamptz,
  unique (source, content_version)
);

create table batch_items (
  id bigserial primary key,
  batch_id bigint references batches (id),
  line_no integer,
  idempotency_key text not null unique,
  user_id bigint,
  endpoint text,
  inputs jsonb,
  state text not null default 'pending'
    check (state in ('pending', 'submitted', 'rejected', 'unknown')),
  request_id text,
  reason text,
  estimate_micros bigint,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index batch_items_batch_idx on batch_items (batch_id, line_no);
create index batch_items_pending_idx on batch_items (created_at) where state = 'pending';

alter table generations
  add column cost_micros bigint not null default 0 check (cost_micros >= 0),
  -- what cost_micros is: 'none' (nothing charged), 'estimate' (at submit), 'computed'
  -- (completed, priced from a duration the output documents), 'requested' (completed,
  -- priced from the requested or default seconds: the output has no duration), 'billed'
  -- (fal's own figure, from its billing events), 'unpriced' (no price row in force)
  add column cost_basis text not null default 'none'
    check (cost_basis in ('none', 'estimate', 'computed', 'requested', 'billed', 'unpriced')),
  add column price_id bigint references prices (id),
  add column billed_seconds numeric,
  add column batch_item_id bigint references batch_items (id),
  add column conflict boolean not null default false,
  -- when fal accepted our cancel (202): an ERROR outcome after it is the cancellation
  add column cancel_requested_at timestamptz,
  add column updated_at timestamptz not null default now(),
  add column archive_status text not null default 'none'
    check (archive_status in ('none', 'pending', 'archived', 'failed')),
  add column archive_url text,
  add column archived_at timestamptz,
  add column archive_attempts integer not null default 0,
  add column archive_error text,
  add column archive_bytes bigint,
  add column archive_sha256 text;

-- The reconciler's work list stays small however many rows are finished.
create index generations_open_idx on generations (created_at)
  where status in ('submitted', 'in_progress');
-- The archiver's backlog.
create index generations_archive_backlog_idx on generations (finished_at)
  where status = 'completed' and archive_status = 'pending';
-- Prompt search (the seed's GIN on inputs serves only exact containment).
create index generations_prompt_fts_idx on generations
  using gin (to_tsvector('english', coalesce(inputs ->> 'prompt', '')));

-- The inbox of raw events (webhook deliveries, reconciler observations). Every accepted
-- event is stored here; `applied_at` stays null while its generation row does not exist
-- yet (a "waiting" event). The same event delivered twice has the same dedupe_key and is stored once. The key
-- ignores gateway_request_id, which fal changes when it retries internally.
create function rq_event_dedupe_key(p_request_id text, p_kind text, p_payload jsonb,
                                    p_error text)
returns text
language sql immutable parallel safe
as $$
  select p_request_id || ':' || p_kind || ':'
         || md5(coalesce(p_payload::text, '') || E'\x1f' || coalesce(p_error, ''))
$$;

create table generation_events (
  id bigserial primary key,
  request_id text not null,
  source text not null check (source in ('webhook', 'reconcile', 'api')),
  kind text not null check (kind in ('in_progress', 'completed', 'failed', 'canceled')),
  payload jsonb,
  error text,
  gateway_request_id text,
  dedupe_key text generated always as (
    rq_event_dedupe_key(request_id, kind, payload, error)
  ) stored,
  received_at timestamptz not null default now(),
  applied_at timestamptz,
  outcome text check (outcome in ('applied', 'duplicate', 'stale', 'conflict')),
  -- still waiting for its row after the retention period (another fal account, a submit
  -- whose outcome is unknown): kept, and applied should the row appear after all
  expired_at timestamptz,
  -- why the last attempt to apply it failed (the event is skipped, the others go on)
  apply_error text,
  apply_failed_at timestamptz
);
create unique index generation_events_dedupe_key on generation_events (dedupe_key);
create index generation_events_request_idx on generation_events (request_id, id);
create index generation_events_waiting_idx on generation_events (received_at)
  where applied_at is null;

-- Per-user monthly budgets (month = first day of the month, UTC).
create table user_budgets (
  user_id bigint not null,
  month date not null check (extract(day from month) = 1),
  limit_micros bigint not null check (limit_micros >= 0),
  primary key (user_id, month)
);

-- Monthly spend report tables, rewritten one partition (month) per transaction.
create table spend_monthly_by_user (
  month date not null,
  user_id bigint not null,
  generations integer not null,
  completed integer not null,
  failed integer not null,
  canceled integer not null,
  open integer not null,
  cost_micros bigint not null,
  cost_cents bigint not null,
  computed_at timestamptz not null default now(),
  primary key (month, user_id)
);

create table spend_monthly_by_endpoint (
  month date not null,
  endpoint text not null,
  generations integer not null,
  completed integer not null,
  failed integer not null,
  canceled integer not null,
  open integer not null,
  billed_seconds numeric not null,
  cost_micros bigint not null,
  cost_cents bigint not null,
  computed_at timestamptz not null default now(),
  primary key (month, endpoint)
);
