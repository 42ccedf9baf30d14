-- The reconciler's named queries (renderqueue_pipeline/reconcile/). It writes nothing
-- itself: what it learns from fal goes through record_events (source 'reconcile').

-- name: reconcile_open_rows
-- Open rows older than %(min_age)s, oldest first, through the partial index
-- generations_open_idx (its predicate is repeated exactly so the planner can use it).
select request_id, endpoint, status::text as status, created_at,
       created_at < now() - %(max_open)s::interval as past_limit
from generations
where status in ('submitted', 'in_progress')
  and created_at < now() - %(min_age)s::interval
order by created_at
limit %(limit)s;

-- name: reconcile_payload_missing_rows
-- Completed rows whose webhook carried no payload, while fal may still keep the result.
select request_id, endpoint, status::text as status, finished_at as created_at,
       false as past_limit
from generations
where status = 'completed' and outputs is null
  and finished_at > now() - %(result_window)s::interval
order by finished_at
limit %(limit)s;

-- name: reconcile_row_states
-- The rows' states after the run applied its events (for the report).
select request_id, status::text as status, outputs is not null as has_output
from generations
where request_id = any(%(request_ids)s);
