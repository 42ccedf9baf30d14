-- The demo (`renderqueue demo --headless`) and the local stack (`renderqueue dev`): set up
-- the sample's budget, wait for the sample batch, and read what the one-screen summary
-- prints. Read-only except demo_budget_exists' caller, which writes through set_budget.

-- name: demo_budget_exists
select 1 from user_budgets where user_id = %(user_id)s and month = %(month)s;

-- name: demo_terminal_count
-- How many of the requests have reached one of `statuses` (the webhooks have landed).
select count(*) as n from generations
where request_id = any(%(request_ids)s) and status::text = any(%(statuses)s);

-- name: demo_open_and_unarchived
select count(*) filter (where status in ('submitted', 'in_progress')) as open,
       count(*) filter (where status = 'completed' and archive_status <> 'archived')
           as unarchived
from generations where request_id = any(%(request_ids)s);

-- name: demo_batch_request_ids
select request_id from batch_items
where batch_id = any(%(batch_ids)s) and request_id is not null order by id;

-- name: demo_generation_for_truth
select status::text as status, cost_micros, archive_status
from generations where request_id = %(request_id)s;

-- name: demo_written_before
-- Request ids whose generation row was written before this run started.
select request_id from generations
where request_id = any(%(request_ids)s) and created_at < %(started)s;

-- name: demo_sample_batches
-- The sample file's batches, each with how many of its generations are still open.
select b.id, b.status,
       count(g.id) filter (where g.status in ('submitted', 'in_progress')) as open
from batches b
left join batch_items i on i.batch_id = b.id
left join generations g on g.request_id = i.request_id
where b.source like %(source_pattern)s
group by b.id, b.status;

-- name: demo_summary_by_status
select status::text as status, count(*) as n, coalesce(sum(cost_micros), 0) as c
from generations where request_id = any(%(request_ids)s) group by 1 order by 1;

-- name: demo_summary_rejected
select line_no, reason from batch_items
where batch_id = any(%(batch_ids)s) and state = 'rejected' order by line_no;

-- name: demo_summary_by_user
select user_id, count(*) as n, coalesce(sum(cost_micros), 0) as c
from generations where request_id = any(%(request_ids)s) group by 1 order by 3 desc;

-- name: demo_summary_archived
select count(*) as n, coalesce(sum(archive_bytes), 0) as b from generations
where request_id = any(%(request_ids)s) and archive_status = 'archived';

-- name: demo_summary_cost_basis
select cost_basis, count(*) as n from generations
where request_id = any(%(request_ids)s) and status = 'completed' group by 1 order by 1;

-- name: demo_summary_lengths
select count(measured_seconds) as measured, count(measured_seconds_problem) as unreadable
from generations where request_id = any(%(request_ids)s) and status = 'completed';

-- name: demo_summary_billing_day
-- The billing check's outcomes of one UTC day (the day the demo ran it for).
select outcome, sum(requests) as n, sum(our_micros) as ours, sum(fal_micros) as fal
from billing_reconciliation_days where day = %(day)s group by 1 order by 1;
