-- Batches and their items. An item is the intent record of rule 1: written before fal is
-- called, it becomes `submitted` (with the request_id) in the transaction that inserts the
-- generation row. An item left `pending` past a deadline is an "unknown outcome".
--
-- A prompts file is ingested once by its content, whatever its name: the content's sha256
-- is the one key. The run hashes the file before it writes anything, and a second file
-- with the same bytes finds the batch that already exists. A batch can be canceled (its
-- queued and running requests are canceled at fal, and no further row of it is submitted).
create table batches (
  id bigserial primary key,
  source text not null,
  content_version text not null default '',
  default_user_id bigint,
  max_cost_micros bigint check (max_cost_micros >= 0),
  status text not null default 'open'
    check (status in ('open', 'done', 'failed', 'canceled')),
  created_at timestamptz not null default rq_now(),
  finished_at timestamptz,
  content_sha256 text,
  content_bytes bigint,
  -- the endpoint of rows that name none
  default_endpoint text,
  default_inputs jsonb not null default '{}',
  rows_total_estimate bigint,
  error text
);
create unique index batches_content_sha256_key on batches (content_sha256);

-- `reject_kind`: why a row was not submitted, so counts and the rejection table can tell a
-- bad row from a row over budget: 'invalid' (the row itself), 'over_budget' (the user's
-- monthly budget or the batch's max_cost_usd) or 'fal' (fal refused it). `reject_field`
-- names the column or setting at fault.
-- `sent_at`: set just before fal is called (many at once, one statement), in the statement
-- that admits the item against the budget of the UTC month of `sent_at`; the generation row
-- later written for it gets `created_at = sent_at`, so admission and spend fall in the same
-- month (the month the request reaches fal). After a crash a pending item with `sent_at`
-- may be at fal (unknown outcome); one without was never sent and is simply sent by the
-- next run.
-- `claimed_by`: who may send the item (a batch run's or a single submission's identity).
-- `lease_until`: the claimer is alive until then; a run refreshes it while it sends
-- (including while fal throttles it with 429s). `mark_unknown_outcomes` takes only
-- pending items whose lease expired.
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
  created_at timestamptz not null default rq_now(),
  updated_at timestamptz not null default rq_now(),
  sent_at timestamptz,
  reject_kind text check (reject_kind in ('invalid', 'over_budget', 'fal')),
  reject_field text,
  cancel_outcome text,
  cancel_at timestamptz,
  claimed_by text,
  lease_until timestamptz
);
create index batch_items_batch_idx on batch_items (batch_id, line_no);
-- A run's heartbeat finds its pending items here (pending items only, few); no index of
-- its own, so an intent costs no extra index write. No index on sent_at: it would turn the
-- claim's UPDATE of sent_at from a HOT update into one more index write per item.
create index batch_items_pending_idx on batch_items (created_at) where state = 'pending';
create unique index batch_items_batch_line_key on batch_items (batch_id, line_no)
  where batch_id is not null;
-- Month-to-date in-flight estimates of one user (budget checks): the user's pending and
-- unknown items, few rows per user.
create index batch_items_user_open_idx on batch_items (user_id, created_at)
  where state in ('pending', 'unknown');
