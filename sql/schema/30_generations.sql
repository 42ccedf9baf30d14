-- The seed article's table, enum and four indexes, exactly: every query in the article
-- runs unchanged against this schema. The ledger's columns follow the seed's; they all
-- have defaults, so the seed article's own INSERT and UPDATE statements keep working
-- unchanged. The rules over this table (pricing, the state machine, the guard and the
-- other triggers) are in sql/functions/ledger.sql.

create type generation_status as enum (
  'submitted', 'in_progress', 'completed', 'failed', 'canceled'
);

create table generations (
  -- the seed article's columns
  id bigserial primary key,
  request_id text not null,
  user_id bigint not null,
  endpoint text not null,
  inputs jsonb not null,
  outputs jsonb,                -- fal's payload exactly as fal sent it
  status generation_status not null default 'submitted',
  cost_cents integer not null default 0,
  error text,
  created_at timestamptz not null default now(),
  finished_at timestamptz,
  -- exact money: what cost_micros is: 'none' (nothing charged), 'estimate' (at submit),
  -- 'computed' (completed, priced from a duration the output documents), 'requested'
  -- (completed, priced from the requested or default seconds: the output has no duration),
  -- 'measured' (priced from the archived file's own length), 'billed' (fal's own figure,
  -- from its billing events), 'unpriced' (no price row in force)
  cost_micros bigint not null default 0 check (cost_micros >= 0),
  cost_basis text not null default 'none'
    check (cost_basis in ('none', 'estimate', 'computed', 'requested', 'measured', 'billed',
                          'unpriced')),
  price_id bigint references prices (id),
  billed_seconds numeric,
  batch_item_id bigint references batch_items (id),
  conflict boolean not null default false,
  -- when fal accepted our cancel (202): an ERROR outcome after it is the cancellation
  cancel_requested_at timestamptz,
  updated_at timestamptz not null default rq_now(),
  -- the archive (sql/functions/archive.sql): none | pending | archived | failed | lost.
  -- `lost` = fal's CDN answered 404/410: the file is gone for good, never fetched again.
  archive_status text not null default 'none'
    check (archive_status in ('none', 'pending', 'archived', 'failed', 'lost')),
  archive_url text,
  archived_at timestamptz,
  archive_attempts integer not null default 0,
  archive_error text,
  archive_bytes bigint,
  archive_sha256 text,
  -- The deadline of fal's copy of the outputs: the submit time plus the
  -- X-Fal-Object-Lifecycle-Preference the gateway sent (null: no expiry was asked for, or
  -- the row was not submitted through the gateway). The archiver copies outputs before it.
  fal_expires_at timestamptz,
  -- Not before: a claimed row's lease, or the backoff after a failed attempt.
  archive_next_attempt_at timestamptz,
  -- Why the last attempt failed, as a short code (gone, host_not_allowed, address_refused,
  -- too_large, length_mismatch, http_error, network, storage, no_media, bad_url).
  archive_failure text,
  -- Deleting fal's copy after a safe archive (RENDERQUEUE_DELETE_FAL_COPY=1).
  fal_delete_status text not null default 'none'
    check (fal_delete_status in ('none', 'pending', 'deleted', 'failed')),
  fal_delete_attempts integer not null default 0,
  fal_delete_next_attempt_at timestamptz,
  fal_delete_error text,
  fal_deleted_at timestamptz,
  -- fal's figure beside ours (sql/schema/60_billing.sql). When fal's bill for a completed
  -- generation is known the generation's cost becomes fal's figure (cost_basis 'billed');
  -- our own figure and its basis stay in computed_cost_micros / computed_cost_basis, so
  -- both remain readable.
  fal_billed_micros bigint check (fal_billed_micros >= 0),
  fal_billed_nano_usd bigint check (fal_billed_nano_usd >= 0),
  fal_billed_at timestamptz,
  computed_cost_micros bigint check (computed_cost_micros >= 0),
  computed_cost_basis text,
  -- The request a duplicate repeats (sql/functions/adopt.sql; null when the item had none).
  duplicate_of text,
  -- The length the archived file's header states (seconds), once read.
  measured_seconds numeric check (measured_seconds > 0),
  -- Why the archived file's length could not be read (null once it was read).
  measured_seconds_problem text
);

comment on column generations.fal_expires_at is
  'when fal deletes this generation''s output files, by the lifecycle asked for at submit';
comment on column generations.duplicate_of is
  'a second request fal has for the same batch item (a retried submit): the item''s request';

-- The seed article's four indexes.
create unique index generations_request_id_key
  on generations (request_id);
create index generations_user_created_idx
  on generations (user_id, created_at desc);
create index generations_endpoint_status_idx
  on generations (endpoint, status);
create index generations_inputs_gin_idx
  on generations using gin (inputs);

-- The reconciler's work list stays small however many rows are finished.
create index generations_open_idx on generations (created_at)
  where status in ('submitted', 'in_progress');
-- The reconciler's second work list: completed rows whose webhook carried no payload
-- (fal's payload_error). fal keeps a result for about an hour, so the reconciler fetches it
-- on its first pass; this index keeps that look-up small however many rows are finished.
create index generations_payload_missing_idx on generations (finished_at)
  where status = 'completed' and outputs is null;
-- The archiver's backlog.
create index generations_archive_backlog_idx on generations (finished_at)
  where status = 'completed' and archive_status = 'pending';
-- The archive's work list, nearest deadline first.
create index generations_archive_due_idx
  on generations (fal_expires_at nulls last, finished_at)
  where status = 'completed' and archive_status = 'pending';
-- Copies of fal's files still to delete.
create index generations_fal_delete_due_idx
  on generations (fal_delete_next_attempt_at nulls first)
  where fal_delete_status = 'pending';
-- Prompt search (the seed's GIN on inputs serves only exact containment).
create index generations_prompt_fts_idx on generations
  using gin (to_tsvector('english', coalesce(inputs ->> 'prompt', '')));
-- No BRIN index on created_at: updates move row versions into old pages, so its ranges
-- widen until a one-day query reads the whole table (sql/migrations/003_no_brin_on_created_at.sql).
-- A day or a month of generations by creation time is found through
-- generations_user_created_idx (a skip scan over the users) or a plain scan.

-- One state machine step: what an event does to a row (sql/functions/ledger.sql, rq_next).
create type rq_step as (outcome text, next generations);
