-- Batch submission and budgets: batches, their items, per-user monthly budgets.
-- The intent itself is written by the ledger (insert_batch_item, mark_item_submitted,
-- mark_item_rejected in ledger.sql); these queries read around it and record what the
-- ledger does not: rows rejected before an intent, unknown outcomes, cancels.

-- name: insert_batch
insert into batches (source, content_version, content_sha256, content_bytes,
                     default_endpoint, default_user_id, default_inputs, max_cost_micros,
                     rows_total_estimate)
values (%(source)s, %(content_version)s, %(sha256)s, %(size)s,
        %(endpoint)s, %(default_user_id)s, %(default_inputs)s, %(max_cost_micros)s,
        %(rows_estimate)s)
on conflict (content_sha256) do nothing
returning id, source, status, created_at;

-- name: batch_by_sha256
select id, source, status, created_at from batches where content_sha256 = %(sha256)s;

-- name: batch_by_id
select id, source, content_version, content_sha256, content_bytes, default_endpoint,
       default_user_id, default_inputs, max_cost_micros, status, rows_total_estimate, error,
       created_at, finished_at
from batches where id = %(batch_id)s;

-- name: recent_batches
select b.id, b.source, b.status, b.created_at, b.finished_at,
       count(i.id) as rows,
       count(*) filter (where i.state = 'submitted') as submitted,
       count(*) filter (where i.state = 'rejected') as rejected,
       count(*) filter (where i.state = 'unknown') as unknown
from batches b left join batch_items i on i.batch_id = b.id
group by b.id
order by b.id desc
limit %(limit)s;

-- name: try_lock_batch
-- a session lock held for the whole run: one submitting run per batch at a time
select pg_try_advisory_lock(hashtextextended('renderqueue:batch:' || %(batch_id)s::text, 0))
       as locked;

-- name: unlock_batch
select pg_advisory_unlock(hashtextextended('renderqueue:batch:' || %(batch_id)s::text, 0))
       as unlocked;

-- name: orphaned_items_to_unknown
-- run with the batch lock held: a pending item is then the trace of a run that died
-- between its intent and fal's answer; fal may or may not have the request
update batch_items
set state = 'unknown',
    reason = 'a run stopped between recording the intent and fal''s answer: fal may or may '
             || 'not have the request (resubmit only with resubmit_unknown)',
    updated_at = now()
where batch_id = %(batch_id)s and state = 'pending' and sent_at is not null
returning id, line_no;

-- name: unsent_pending_items
-- intents a stopped run recorded but never sent (sent_at null): the next run sends them
select id, line_no, user_id, endpoint, inputs
from batch_items
where batch_id = %(batch_id)s and state = 'pending' and sent_at is null
order by line_no;

-- name: claim_for_send
-- just before the calls to fal: THE admission (rq_claim_for_send, sql/functions/admission.sql). Admitted items
-- may be at fal from now on; items over budget are rejected with the figures
select item_id, admitted, reason
from rq_claim_for_send(%(item_ids)s::bigint[], %(claimer)s, %(lease)s::interval,
                       %(default_limit)s::bigint);

-- name: refresh_leases
-- a sender's heartbeat: its pending items stay its own (the reconciler leaves them alone)
update batch_items set lease_until = rq_now() + %(lease)s::interval
where claimed_by = %(claimer)s and state = 'pending';

-- name: claim_unsent_item
-- a re-run takes over an intent its stopped predecessor recorded but never sent (the
-- batch lock proves that run is gone), priced again; it is admitted when it is sent
update batch_items
set claimed_by = %(claimer)s, lease_until = rq_now() + %(lease)s::interval,
    estimate_micros = %(estimate_micros)s, updated_at = rq_now()
where id = %(item_id)s and state = 'pending' and sent_at is null
returning id;

-- name: unmark_item_sent
-- fal refused our key: the call enqueued nothing, the item is unsent again
update batch_items set sent_at = null
where id = %(item_id)s and state = 'pending';

-- name: batch_line_numbers
select line_no from batch_items where batch_id = %(batch_id)s;

-- name: batch_cost_so_far
select coalesce(sum(estimate_micros), 0) as micros
from batch_items
where batch_id = %(batch_id)s and state in ('pending', 'submitted', 'unknown');

-- name: unknown_items_to_resubmit
select id, line_no, user_id, endpoint, inputs, estimate_micros
from batch_items
where batch_id = %(batch_id)s and state = 'unknown'
order by line_no;

-- name: reopen_unknown_item
-- --resubmit-unknown: the item is sent again only once admitted again (claim_for_send)
update batch_items
set state = 'pending', reason = null, sent_at = null, claimed_by = %(claimer)s,
    lease_until = rq_now() + %(lease)s::interval, updated_at = rq_now()
where id = %(item_id)s and state = 'unknown'
returning id;

-- name: insert_rejected_item
insert into batch_items (batch_id, line_no, idempotency_key, user_id, endpoint, inputs,
                         state, reason, reject_kind, reject_field, estimate_micros)
values (%(batch_id)s, %(line_no)s, %(idempotency_key)s, %(user_id)s, %(endpoint)s,
        %(inputs)s, 'rejected', %(reason)s, %(kind)s, %(field)s, %(estimate_micros)s)
on conflict (idempotency_key) do nothing;

-- name: reject_pending_item
-- an intent that does not fit a budget, turned down in the transaction that wrote it
update batch_items
set state = 'rejected', reason = %(reason)s, reject_kind = %(kind)s,
    reject_field = %(field)s, updated_at = now()
where id = %(item_id)s and state = 'pending';

-- name: label_rejected_item
update batch_items
set reject_kind = %(kind)s, reject_field = %(field)s, reason = coalesce(%(reason)s, reason)
where id = %(item_id)s and state = 'rejected';

-- name: mark_item_unknown
update batch_items
set state = 'unknown', reason = %(reason)s, updated_at = now()
where id = %(item_id)s and state = 'pending';

-- name: forget_unsent_items
-- intents whose call to fal was provably never made (the run stopped first)
delete from batch_items
where id = any(%(item_ids)s) and state = 'pending' and sent_at is null;

-- name: batch_status
select status from batches where id = %(batch_id)s;

-- name: finish_batch
update batches
set status = %(status)s, error = %(error)s, finished_at = now()
where id = %(batch_id)s and status in ('open', 'done', 'failed');

-- name: reopen_batch
update batches set status = 'open', error = null, finished_at = null
where id = %(batch_id)s and status in ('done', 'failed');

-- name: batch_counts
select count(*) as read,
       count(*) filter (where state = 'submitted') as submitted,
       count(*) filter (where state = 'rejected' and reject_kind is distinct from 'over_budget')
         as rejected,
       count(*) filter (where state = 'rejected' and reject_kind = 'over_budget')
         as over_budget,
       count(*) filter (where state = 'unknown') as unknown,
       count(*) filter (where state = 'pending') as pending,
       coalesce(sum(estimate_micros) filter (where state = 'submitted'), 0)
         as submitted_estimate_micros
from batch_items where batch_id = %(batch_id)s;

-- name: batch_rejections
select line_no, coalesce(reject_field, '') as field, reason, reject_kind
from batch_items
where batch_id = %(batch_id)s and state = 'rejected'
order by line_no
limit %(limit)s;

-- name: batch_unknown_items
select line_no, user_id, endpoint, reason, updated_at
from batch_items
where batch_id = %(batch_id)s and state = 'unknown'
order by line_no
limit %(limit)s;

-- name: batch_generation_states
select g.status::text as status, count(*) as generations,
       coalesce(sum(g.cost_micros), 0) as cost_micros
from batch_items i join generations g on g.request_id = i.request_id
where i.batch_id = %(batch_id)s
group by g.status order by g.status;

-- name: batch_open_requests
-- what a cancel asks fal to stop: submitted rows still queued or running
select i.id as item_id, i.line_no, g.request_id, g.endpoint, g.status::text as status
from batch_items i join generations g on g.request_id = i.request_id
where i.batch_id = %(batch_id)s and g.status in ('submitted', 'in_progress')
order by i.line_no;

-- name: mark_batch_canceled
update batches set status = 'canceled', finished_at = coalesce(finished_at, now())
where id = %(batch_id)s
returning id;

-- name: record_cancel_outcome
update batch_items set cancel_outcome = %(outcome)s, cancel_at = now(), updated_at = now()
where id = %(item_id)s;

-- name: upsert_user_budget
insert into user_budgets (user_id, month, limit_micros)
values (%(user_id)s, %(month)s, %(limit_micros)s)
on conflict (user_id, month) do update set limit_micros = excluded.limit_micros
returning user_id, month, limit_micros;

-- name: budget_users_for_month
-- users with a budget row for the month or any spend in it (null month: the current one)
with m as (
  select coalesce(%(month)s::date, date_trunc('month', rq_now() at time zone 'utc')::date)
         as month
)
select user_id from user_budgets where month = (select month from m)
union
select user_id from generations
where created_at >= (select month from m)::timestamp at time zone 'utc'
  and created_at < ((select month from m)::timestamp + interval '1 month') at time zone 'utc'
order by user_id;

-- name: user_month_figures
-- one user's month (UTC; null month: the current one): the figures every budget decision
-- reads (rq_budget_figures, sql/functions/admission.sql)
with m as (
  select coalesce(%(month)s::date, date_trunc('month', rq_now() at time zone 'utc')::date)
         as month
)
select m.month, f.limit_micros, f.actual_micros, f.in_flight_micros
from m, rq_budget_figures(%(user_id)s, m.month) f;

-- name: current_utc_month
select date_trunc('month', rq_now() at time zone 'utc')::date as month;

-- name: our_requests_waiting_at_fal
-- Our requests fal has not finished for one endpoint, by user (the fan-out's queued bound
-- and fair share, docs/batch.md "Fairness"): `submitted` rows, i.e. queued or running at
-- fal (running ones are at most the account's cap). Rows older than the window are
-- ignored, so a lost webhook cannot stop batches for ever. Served by
-- generations_endpoint_status_idx.
select user_id, count(*)::int as waiting
from generations
where endpoint = %(endpoint)s and status = 'submitted'
  and created_at > rq_now() - make_interval(secs => %(window_seconds)s)
group by user_id;
