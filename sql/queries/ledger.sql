-- The ledger's named queries. Loaded with every sql/queries/*.sql by renderqueue_pipeline/db/queries.py.
-- Parameters are psycopg named placeholders: %(name)s. The ledger rules themselves are
-- SQL functions and triggers in 003_ledger_rules.sql; these queries only call them.

-- name: estimate
select price_id, seconds, cost_micros, price_version
from rq_estimate(%(endpoint)s, %(inputs)s, coalesce(%(at)s::timestamptz, now()));

-- name: endpoint_prices
select resolution, with_audio
from prices
where endpoint = %(endpoint)s and effective_from <= coalesce(%(at)s::timestamptz, now())
order by resolution nulls first, with_audio nulls first;

-- name: priced_endpoints
select distinct endpoint from prices order by endpoint;

-- name: insert_batch_item
insert into batch_items (batch_id, line_no, idempotency_key, user_id, endpoint, inputs,
                         estimate_micros)
values (%(batch_id)s, %(line_no)s, %(idempotency_key)s, %(user_id)s, %(endpoint)s,
        %(inputs)s, %(estimate_micros)s)
on conflict (idempotency_key) do nothing
returning id, state, request_id;

-- name: batch_item_by_key
select id, state, request_id from batch_items where idempotency_key = %(idempotency_key)s;

-- name: insert_generation
insert into generations (request_id, user_id, endpoint, inputs, cost_micros, cost_basis,
                         price_id, billed_seconds, batch_item_id, fal_expires_at)
values (%(request_id)s, %(user_id)s, %(endpoint)s, %(inputs)s, %(cost_micros)s, 'estimate',
        %(price_id)s, %(seconds)s, %(batch_item_id)s, %(fal_expires_at)s)
on conflict (request_id) do nothing
returning id;

-- name: mark_item_submitted
update batch_items
set state = 'submitted', request_id = %(request_id)s, updated_at = now()
where id = %(item_id)s and state in ('pending', 'unknown');

-- name: mark_item_rejected
update batch_items
set state = 'rejected', reason = %(reason)s, updated_at = now()
where id = %(item_id)s and state = 'pending';

-- name: mark_unknown_outcomes
update batch_items
set state = 'unknown',
    reason = 'submit started but no request id was recorded: fal may or may not have the request',
    updated_at = now()
where state = 'pending' and created_at < now() - %(older_than)s::interval
returning id, batch_id, line_no, user_id, endpoint;

-- name: record_events_batch
-- every writer of events (webhook group commit, reconciler, tests): %(events)s is a JSON
-- array of events in arrival order; one row per event, `ord` its 1-based position
select ord, event_id, outcome from rq_record_events(%(events)s);

-- name: apply_event
select rq_apply_event(%(event_id)s) as outcome;

-- name: waiting_events_with_row
select e.id
from generation_events e
where e.applied_at is null
  and exists (select 1 from generations g where g.request_id = e.request_id)
order by e.id
limit %(limit)s;

-- name: waiting_event_count
select count(*) as waiting from generation_events where applied_at is null;

-- name: generation_by_request_id
select * from generations where request_id = %(request_id)s;

-- name: events_for_request
select id, source, kind, outcome, applied_at, received_at
from generation_events where request_id = %(request_id)s order by id;

-- name: status_counts
select status::text as status, count(*) as generations,
       coalesce(sum(cost_micros), 0) as cost_micros
from generations group by status order by status;

-- name: spend_by_endpoint
select endpoint, count(*) as generations, coalesce(sum(cost_micros), 0) as cost_micros
from generations group by endpoint order by cost_micros desc, endpoint;
