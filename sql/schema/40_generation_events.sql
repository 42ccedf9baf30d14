-- The inbox of raw events (webhook deliveries, reconciler observations). Every accepted
-- event is stored here; `applied_at` stays null while its generation row does not exist
-- yet (a "waiting" event). The same event delivered twice has the same dedupe_key and is
-- stored once. The key ignores gateway_request_id, which fal changes when it retries
-- internally. The key's function is defined here, with the table: the stored column is
-- computed from it, so changing it is a table change (a migration), never a replace.
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
  received_at timestamptz not null default rq_now(),
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
-- The waiting events by id, for apply_waiting_events' chunks.
create index generation_events_waiting_id_idx on generation_events (id)
  where applied_at is null;
