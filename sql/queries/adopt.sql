-- Adopting fal's requests (renderqueue_pipeline/reconcile/adopt.py). The decision for each
-- request is rq_adopt_fal_request's (sql/functions/adopt.sql); these only call it
-- and read around it.

-- name: adopt_fal_request
select outcome, item_id, first_request_id, reason
from rq_adopt_fal_request(%(request_id)s, %(endpoint)s, %(tags)s, %(fal_status)s,
                          %(sent_at)s, %(fal_expires_at)s);

-- name: adopt_endpoints
-- the endpoints we use: every priced endpoint, and any an item asked for in the lookback
select endpoint from prices
union
select endpoint from batch_items
where endpoint is not null and created_at > rq_now() - %(lookback)s::interval
order by endpoint;

-- name: fal_scan_position
select endpoint, scanned_to from fal_request_scans where endpoint = any(%(endpoints)s);

-- name: save_fal_scan
insert into fal_request_scans (endpoint, scanned_to, requests_seen, updated_at)
values (%(endpoint)s, %(scanned_to)s, %(seen)s, rq_now())
on conflict (endpoint) do update
set scanned_to = greatest(fal_request_scans.scanned_to, excluded.scanned_to),
    requests_seen = fal_request_scans.requests_seen + excluded.requests_seen,
    updated_at = excluded.updated_at;

-- name: duplicates_to_cancel
-- second requests of an item that fal may still run: the reconciler asks fal to cancel
select request_id, endpoint, batch_item_id, duplicate_of
from generations
where duplicate_of is not null and status in ('submitted', 'in_progress')
  and cancel_requested_at is null
order by id;

-- name: unexplained_orphans
select request_id, endpoint, tags, reason, fal_status, fal_sent_at, first_seen_at
from fal_orphan_requests
where explained_at is null
order by first_seen_at, request_id
limit %(limit)s;

-- name: orphan_counts
select count(*) filter (where explained_at is null) as unexplained,
       count(*) filter (where explained_at is not null) as explained
from fal_orphan_requests;

-- name: explain_orphan
update fal_orphan_requests
set explained_at = rq_now(), explanation = %(explanation)s
where request_id = %(request_id)s
returning request_id, endpoint, explained_at;

-- name: unknown_items_sent_since
-- unknown items of a batch and when they were sent (the resubmit rule reads fal's list
-- from the earliest of them)
select id, line_no, endpoint, sent_at, created_at
from batch_items
where batch_id = %(batch_id)s and state = 'unknown'
order by line_no;

-- name: named_requests
-- which of these request ids the ledger already names (a row, or a recorded orphan)
select request_id from generations where request_id = any(%(ids)s)
union all
select request_id from fal_orphan_requests where request_id = any(%(ids)s);
