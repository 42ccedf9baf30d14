-- Batch submission: a prompts file is ingested once by its content, whatever its name.
--
-- `batches (source, content_version)` let a renamed or re-uploaded copy of the same file
-- through as a new batch. The content's sha256 is now the one key: the run hashes the
-- file before it writes anything, and a second file with the same bytes finds the batch
-- that already exists.
alter table batches drop constraint if exists batches_source_content_version_key;
alter table batches
  add column content_sha256 text,
  add column content_bytes bigint,
  add column default_endpoint text,
  add column default_inputs jsonb not null default '{}',
  add column rows_total_estimate bigint,
  add column error text;
create unique index batches_content_sha256_key on batches (content_sha256);

-- A batch can be canceled (its queued and running requests are canceled at fal, and no
-- further row of it is submitted).
alter table batches drop constraint if exists batches_status_check;
alter table batches add constraint batches_status_check
  check (status in ('open', 'done', 'failed', 'canceled'));

-- Why a row was not submitted, by kind, so counts and the rejection table can tell a bad
-- row from a row over budget: `reject_kind` is 'invalid' (the row itself), 'over_budget'
-- (the user's monthly budget or the batch's max_cost_usd) or 'fal' (fal refused it).
-- `reject_field` names the column or setting at fault.
-- `sent_at`: set just before fal is called (many at once, one statement). After a crash
-- a pending item with `sent_at` may be at fal (unknown outcome); one without was never
-- sent and is simply sent by the next run.
alter table batch_items
  add column sent_at timestamptz,
  add column reject_kind text check (reject_kind in ('invalid', 'over_budget', 'fal')),
  add column reject_field text,
  add column cancel_outcome text,
  add column cancel_at timestamptz;
create unique index batch_items_batch_line_key on batch_items (batch_id, line_no)
  where batch_id is not null;
-- Month-to-date in-flight estimates of one user (budget checks).
create index batch_items_user_open_idx on batch_items (user_id, created_at)
  where state in ('pending', 'unknown');
