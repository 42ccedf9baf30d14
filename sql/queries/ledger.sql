-- The ledger's named queries. Loaded with every sql/queries/*.sql by renderqueue_pipeline/db/queries.py.
-- Parameters are psycopg named placeholders: %(name)s. The ledger rules themselves are
-- SQL functions and triggers in sql/functions/ledger.sql; these queries only call them.

-- name: validate_and_estimate
-- the duration read by rq_parse_duration (its one definition) and the price in force;
-- price columns are null when no price row matches
select d.problem as duration_problem, e.price_id, e.seconds, e.cost_micros, e.price_version
from rq_parse_duration(%(inputs)s::jsonb -> 'duration') d
left join rq_estimate(%(endpoint)s, %(inputs)s, coalesce(%(at)s::timestamptz, rq_now())) e
  on true;

-- name: endpoint_prices
select resolution, with_audio
from prices
where endpoint = %(endpoint)s and effective_from <= coalesce(%(at)s::timestamptz, now())
order by resolution nulls first, with_audio nulls first;

-- name: priced_endpoints
select distinct endpoint from prices order by endpoint;

-- name: insert_batch_item
-- the key's first caller claims the item (claimed_by, lease) in the same statement
insert into batch_items (batch_id, line_no, idempotency_key, user_id, endpoint, inputs,
                         estimate_micros, claimed_by, lease_until, created_at, updated_at)
values (%(batch_id)s, %(line_no)s, %(idempotency_key)s, %(user_id)s, %(endpoint)s,
        %(inputs)s, %(estimate_micros)s, %(claimer)s, rq_now() + %(lease)s::interval,
        rq_now(), rq_now())
on conflict (idempotency_key) do nothing
returning id, state, request_id, claimed_by, reason, sent_at;

-- name: batch_item_by_key
select id, state, request_id, claimed_by, reason, sent_at
from batch_items where idempotency_key = %(idempotency_key)s;

-- name: batch_item_outcome
-- what a second caller of a key waits for: the first caller's outcome, or its lease ending
select id, state, request_id, reason, claimed_by,
       lease_until is not null and lease_until < rq_now() as lease_expired
from batch_items where id = %(item_id)s;

-- name: insert_generation
-- only on the item the caller claimed, still waiting for its request id (pending, or
-- `unknown` when the reconciler gave up on it: a definite outcome wins); the row's
-- created_at is the moment the item was sent (and admitted): one month for both
insert into generations (request_id, user_id, endpoint, inputs, cost_micros, cost_basis,
                         price_id, billed_seconds, batch_item_id, fal_expires_at, created_at)
select %(request_id)s, %(user_id)s, %(endpoint)s, %(inputs)s, %(cost_micros)s, 'estimate',
       %(price_id)s, %(seconds)s, i.id, %(fal_expires_at)s, coalesce(i.sent_at, rq_now())
from batch_items i
where i.id = %(batch_item_id)s and i.state in ('pending', 'unknown') and i.request_id is null
  and i.claimed_by is not distinct from %(claimer)s
on conflict (request_id) do nothing
returning id;

-- name: batch_item_state
select id, state, request_id, claimed_by from batch_items where id = %(item_id)s;

-- name: mark_item_submitted
update batch_items
set state = 'submitted', request_id = %(request_id)s, updated_at = rq_now()
where id = %(item_id)s and state in ('pending', 'unknown');

-- name: mark_item_rejected
-- fal's definite refusal wins over `unknown` too (the item stops holding budget)
update batch_items
set state = 'rejected', reason = %(reason)s, updated_at = rq_now()
where id = %(item_id)s and state in ('pending', 'unknown')
  and claimed_by is not distinct from %(claimer)s;

-- name: mark_unknown_outcomes
-- only what a sender that stopped left behind: its lease expired (a live run refreshes
-- it, also while fal throttles it) after it sent the item (an intent never sent is not at
-- fal: the batch's next run sends it). Items from before leases (no lease) count as sent.
update batch_items
set state = 'unknown',
    reason = 'submit started but no request id was recorded: fal may or may not have the request',
    updated_at = rq_now()
where state = 'pending' and created_at < rq_now() - %(older_than)s::interval
  and (lease_until is null or (lease_until < rq_now() and sent_at is not null))
returning id, batch_id, line_no, user_id, endpoint;

-- name: record_events_batch
-- every writer of events (webhook group commit, reconciler, tests): %(events)s is a JSON
-- array of events in arrival order; one row per event, `ord` its 1-based position
select ord, event_id, outcome from rq_record_events(%(events)s);

-- name: apply_events
select event_id, outcome from rq_apply_events(%(event_ids)s::bigint[]);

-- name: waiting_events_with_row
-- one chunk of apply_waiting_events, by id after %(after)s: first the events never tried,
-- then (%(failed)s) those that failed before this pass started
select e.id
from generation_events e
where e.applied_at is null
  and e.id > %(after)s
  and case when %(failed)s then e.apply_failed_at < %(started)s
           else e.apply_failed_at is null end
  and exists (select 1 from generations g where g.request_id = e.request_id)
order by e.id
limit %(limit)s;

-- name: waiting_event_count
select count(*) as waiting,
       count(*) filter (where expired_at is not null) as expired,
       count(*) filter (where apply_error is not null) as failing
from generation_events where applied_at is null;

-- name: expire_waiting_events
select rq_expire_waiting_events(%(retention)s::interval) as expired;

-- name: expired_event_count
select count(*) as expired from generation_events
where applied_at is null and expired_at is not null;

-- name: waiting_events
select e.id, e.request_id, e.source, e.kind, e.received_at, e.expired_at,
       e.apply_error,
       exists (select 1 from generations g where g.request_id = e.request_id) as has_row
from generation_events e
where e.applied_at is null
order by e.received_at, e.id
limit %(limit)s;

-- name: mark_cancel_requested
update generations
set cancel_requested_at = coalesce(cancel_requested_at, rq_now())
where request_id = %(request_id)s
returning cancel_requested_at;

-- name: ledger_now
-- The ledger's clock (rq_now, sql/schema/00_clock.sql): now(), unless the session set renderqueue.now.
select rq_now() as now;

-- name: record_cancel_intent
-- Our cancel, written before fal is asked (fal's ERROR for a cancelled queued request can
-- land before its 202 does). The first moment is kept; `newly_recorded` says this call
-- wrote it, so only this call may withdraw it should fal refuse.
with prior as (
  select id, cancel_requested_at
  from generations
  where request_id = %(request_id)s
  for update
), marked as (
  update generations g
  set cancel_requested_at = rq_now()
  from prior
  where g.id = prior.id and prior.cancel_requested_at is null
  returning g.cancel_requested_at
)
select coalesce((select cancel_requested_at from marked), prior.cancel_requested_at)
         as cancel_requested_at,
       exists (select 1 from marked) as newly_recorded
from prior;

-- name: withdraw_cancel_intent
-- fal refused the cancel definitively (already finished, unknown): the intent this call
-- recorded is withdrawn, so a later ERROR is a failure, not a cancellation.
update generations
set cancel_requested_at = null
where request_id = %(request_id)s and cancel_requested_at = %(recorded_at)s
returning id;

-- name: status_counts
select status::text as status, count(*) as generations,
       coalesce(sum(cost_micros), 0) as cost_micros
from generations group by status order by status;

-- name: spend_by_endpoint
select endpoint, count(*) as generations, coalesce(sum(cost_micros), 0) as cost_micros
from generations group by endpoint order by cost_micros desc, endpoint;
