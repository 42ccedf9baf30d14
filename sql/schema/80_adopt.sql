-- Adopting what fal has: every request at fal is named by a generations row or by an orphan.
--
-- Every submit carries our identity in X-Fal-Tags (rq_item, rq_user, rq_batch; values
-- percent-encoded by the gateway, decoded before they reach SQL). The reconciler reads
-- fal's request list for the endpoints we use and hands each request to
-- rq_adopt_fal_request (sql/functions/adopt.sql), the one place that decides what the ledger does with it:
--
--   known      the request id already has a generations row: nothing to do;
--   adopted    the tags name an item that is `pending` or `unknown` (a run died between
--              fal's answer and our write, or the answer was lost): the generations row is
--              written with fal's request id (its budget was admitted when the intent was
--              written), the item becomes `submitted`; stored webhook events apply on insert;
--   duplicate  the tags name an item that already has another request (fal-client retried
--              a submit whose answer was lost) or that we recorded as refused: the request
--              gets its own generations row, `duplicate_of` naming the item's request, at the
--              item's estimate, so a cent fal bills for it is attributable like any other
--              (same user, same batch item, same reports and billing reconciliation); the
--              reconciler cancels it when it is still queued;
--   orphan     no rq_item tag, or tags naming an item this ledger does not have (or whose
--              user, batch or endpoint differ: another deployment sharing the fal account):
--              recorded in fal_orphan_requests until someone explains it.


-- Where each endpoint's scan of fal's request list got to (the next pass starts there,
-- minus the lookback).
create table fal_request_scans (
  endpoint text primary key,
  scanned_to timestamptz not null,
  requests_seen bigint not null default 0,
  updated_at timestamptz not null default rq_now()
);

create table fal_orphan_requests (
  request_id text primary key,
  endpoint text not null,
  tags jsonb not null default '{}',
  reason text not null,
  fal_status text,
  fal_sent_at timestamptz,
  first_seen_at timestamptz not null default rq_now(),
  explained_at timestamptz,
  explanation text,
  check ((explained_at is null) = (explanation is null))
);
create index fal_orphan_requests_unexplained_idx on fal_orphan_requests (first_seen_at)
  where explained_at is null;
