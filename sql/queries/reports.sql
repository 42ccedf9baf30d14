-- The reports domain's named queries (renderqueue_pipeline/reports/). Schema:
-- sql/schema/70_reports.sql (the rollups, the months and the one table of report rows).
-- A generation belongs to the UTC day of its created_at; ranges are [start, end) timestamptz.
-- Open = submitted or in_progress. Unpriced = completed with no price behind its cost.

-- name: rollup_delete_range
delete from spend_rollup_daily where day >= %(first_day)s and day < %(end_day)s;

-- name: rollup_batch_delete_range
delete from spend_rollup_daily_batch where day >= %(first_day)s and day < %(end_day)s;

-- name: rollup_insert_range
-- One pass over the range's generations (found through the (user_id, created_at) index by
-- a skip scan) feeds both rollups: grouped by day, user, endpoint and batch, then summed
-- each way.
with facts as materialized (
  select (g.created_at at time zone 'UTC')::date as day, g.user_id, g.endpoint, bi.batch_id,
         count(*) as generations,
         count(*) filter (where g.status = 'completed') as completed,
         count(*) filter (where g.status = 'failed') as failed,
         count(*) filter (where g.status = 'canceled') as canceled,
         count(*) filter (where g.status in ('submitted', 'in_progress')) as open,
         count(*) filter (where g.status = 'completed'
                          and g.cost_basis in ('unpriced', 'none')) as unpriced,
         coalesce(sum(g.billed_seconds) filter (where g.status = 'completed'), 0)
           as billed_seconds,
         coalesce(sum(g.cost_micros) filter (where g.status = 'completed'), 0) as cost_micros,
         coalesce(sum(g.cost_micros) filter (where g.status in ('submitted', 'in_progress')),
                  0) as open_estimate_micros,
         coalesce(sum(bi.estimate_micros), 0) as submit_estimate_micros,
         coalesce(sum(coalesce(g.computed_cost_micros, g.cost_micros))
                  filter (where g.status = 'completed'), 0) as computed_micros,
         count(g.fal_billed_micros) filter (where g.status = 'completed') as billed_generations,
         coalesce(sum(g.fal_billed_micros) filter (where g.status = 'completed'), 0)
           as fal_billed_micros,
         coalesce(sum(coalesce(g.computed_cost_micros, g.cost_micros))
                  filter (where g.status = 'completed' and g.fal_billed_micros is not null), 0)
           as billed_computed_micros
  from generations g
  -- lateral with limit: one primary-key probe per generation, never a scan of every
  -- intent ever recorded
  left join lateral (select b.batch_id, b.estimate_micros from batch_items b
                     where b.id = g.batch_item_id limit 1) bi on true
  where g.created_at >= %(start)s and g.created_at < %(end)s
  group by 1, 2, 3, 4
),
by_user as (
  insert into spend_rollup_daily (day, user_id, endpoint, generations, completed, failed,
                                  canceled, open, unpriced, billed_seconds, cost_micros,
                                  open_estimate_micros, computed_micros, billed_generations,
                                  fal_billed_micros, billed_computed_micros)
  select day, user_id, endpoint, sum(generations), sum(completed), sum(failed),
         sum(canceled), sum(open), sum(unpriced), sum(billed_seconds), sum(cost_micros),
         sum(open_estimate_micros), sum(computed_micros), sum(billed_generations),
         sum(fal_billed_micros), sum(billed_computed_micros)
  from facts group by day, user_id, endpoint
  returning 1
)
insert into spend_rollup_daily_batch (day, batch_id, generations, completed, failed, canceled,
                                      open, unpriced, billed_seconds, cost_micros,
                                      open_estimate_micros, submit_estimate_micros,
                                      computed_micros, billed_generations, fal_billed_micros,
                                      billed_computed_micros)
select day, batch_id, sum(generations), sum(completed), sum(failed), sum(canceled), sum(open),
       sum(unpriced), sum(billed_seconds), sum(cost_micros), sum(open_estimate_micros),
       sum(submit_estimate_micros), sum(computed_micros), sum(billed_generations),
       sum(fal_billed_micros), sum(billed_computed_micros)
from facts group by day, batch_id;

-- name: rollup_days_upsert
insert into spend_rollup_days (day, computed_at, generations, open, settled, snapshot_at,
                               max_generation_id, max_event_id)
select d.day, %(computed_at)s, coalesce(s.generations, 0), coalesce(s.open, 0),
       %(settle_before)s::date > d.day and coalesce(s.open, 0) = 0,
       %(snapshot_at)s, %(max_generation_id)s, %(max_event_id)s
from unnest(%(days)s::date[]) as d(day)
left join (select day, sum(generations)::int as generations, sum(open)::int as open
           from spend_rollup_daily
           where day = any(%(days)s::date[])
           group by day) s on s.day = d.day
on conflict (day) do update
  set computed_at = excluded.computed_at, generations = excluded.generations,
      open = excluded.open, settled = excluded.settled, snapshot_at = excluded.snapshot_at,
      max_generation_id = excluded.max_generation_id, max_event_id = excluded.max_event_id;

-- name: rollup_days_advance
-- Settled days a refresh found untouched are unchanged up to its snapshot: the next
-- refresh looks for changes after this one only.
update spend_rollup_days
set snapshot_at = %(snapshot_at)s, max_generation_id = %(max_generation_id)s,
    max_event_id = %(max_event_id)s
where day = any(%(days)s::date[]);

-- name: rollup_days_of_month
select day, settled, snapshot_at, max_generation_id, max_event_id
from spend_rollup_days
where day >= %(first_day)s and day < %(end_day)s
order by day;

-- name: ledger_high_water
-- Newest generation and event ids this snapshot sees, and when the snapshot began.
select coalesce((select max(id) from generations), 0) as max_generation_id,
       coalesce((select max(id) from generation_events), 0) as max_event_id,
       now() as snapshot_at;

-- name: days_touched_since
-- Days of a month whose generations were inserted, or received an event, after a refresh
-- saw the given ids. Ids handed out before that refresh but committed after it sit a little
-- below them: within %(overlap)s ids, a row or event written since a little before the
-- refresh's snapshot counts too. Both scans run on primary keys: they cost what changed.
select distinct (g.created_at at time zone 'UTC')::date as day
from generations g
where g.id > %(after_generation_id)s - %(overlap)s
  and (g.id > %(after_generation_id)s or g.updated_at > %(since)s)
  and g.created_at >= %(start)s and g.created_at < %(end)s
union
select distinct (g.created_at at time zone 'UTC')::date
from generation_events e
join generations g on g.request_id = e.request_id
where e.id > %(after_event_id)s - %(overlap)s
  and (e.id > %(after_event_id)s or e.received_at > %(since)s)
  and g.created_at >= %(start)s and g.created_at < %(end)s
union
-- days whose costs the billing reconciliation (spend domain, 070_spend.sql) replaced with
-- fal's billed figures since: it rewrites a day's billing_reconciliation_days each time
select day
from billing_reconciliation_days
where computed_at > %(since)s
  and day >= (%(start)s::timestamptz at time zone 'UTC')::date
  and day < (%(end)s::timestamptz at time zone 'UTC')::date;

-- name: report_rows_delete
delete from spend_report_rows where month = %(month)s;

-- name: report_rows_insert
-- Every report row of the month in one statement (spend_report_rows): the
-- day-user-endpoint rollup summed by user, by endpoint and by day and endpoint (GROUPING
-- SETS), and the batch rollup by batch; each derived figure (cents, the rate, the batch's
-- overrun, fal's billed total and the difference) is written once, over both. Its column
-- list is renderqueue_pipeline/reports/figures.py. (One GROUPING SETS over the union of
-- both rollups also works, but groups every row four times: 1.4x slower, measured.)
insert into spend_report_rows (month, dimension, day, user_id, endpoint, batch_id, source,
                               generations, completed, failed, canceled, open, unpriced,
                               billed_seconds, cost_micros, cost_cents,
                               micros_per_completed_second, open_estimate_micros,
                               submit_estimate_micros, cost_minus_estimate_micros,
                               computed_micros, billed_generations, fal_billed_micros,
                               billed_difference_micros, computed_at)
select %(month)s, r.dimension, r.day, r.user_id, r.endpoint, r.batch_id, b.source,
       r.generations, r.completed, r.failed, r.canceled, r.open, r.unpriced,
       r.billed_seconds, r.cost_micros, rq_micros_to_cents(r.cost_micros),
       round(r.cost_micros / nullif(r.billed_seconds, 0), 3), r.open_estimate_micros,
       case when r.dimension = 'batch' then r.submit_estimate_micros end,
       case when r.dimension = 'batch'
            then r.cost_micros + r.open_estimate_micros - r.submit_estimate_micros end,
       r.computed_micros, r.billed_generations,
       case when r.billed_generations > 0 then r.fal_billed_micros end,
       case when r.billed_generations > 0
            then r.fal_billed_micros - r.billed_computed_micros end,
       %(computed_at)s
from (
  select case when grouping(user_id) = 0 then 'user'
              when grouping(day) = 0 then 'day'
              else 'endpoint' end as dimension,
         day, user_id, endpoint, null::bigint as batch_id,
         sum(generations)::int as generations, sum(completed)::int as completed,
         sum(failed)::int as failed, sum(canceled)::int as canceled,
         sum(open)::int as open, sum(unpriced)::int as unpriced,
         sum(billed_seconds) as billed_seconds, sum(cost_micros)::bigint as cost_micros,
         sum(open_estimate_micros)::bigint as open_estimate_micros,
         0::bigint as submit_estimate_micros,
         sum(computed_micros)::bigint as computed_micros,
         sum(billed_generations)::int as billed_generations,
         sum(fal_billed_micros)::bigint as fal_billed_micros,
         sum(billed_computed_micros)::bigint as billed_computed_micros
  from spend_rollup_daily
  where day >= %(month)s and day < %(end_day)s
  group by grouping sets ((user_id), (endpoint), (day, endpoint))
  union all
  select 'batch', null, null, null, batch_id,
         sum(generations)::int as generations, sum(completed)::int as completed,
         sum(failed)::int as failed, sum(canceled)::int as canceled,
         sum(open)::int as open, sum(unpriced)::int as unpriced,
         sum(billed_seconds) as billed_seconds, sum(cost_micros)::bigint as cost_micros,
         sum(open_estimate_micros)::bigint as open_estimate_micros,
         sum(submit_estimate_micros)::bigint as submit_estimate_micros,
         sum(computed_micros)::bigint as computed_micros,
         sum(billed_generations)::int as billed_generations,
         sum(fal_billed_micros)::bigint as fal_billed_micros,
         sum(billed_computed_micros)::bigint as billed_computed_micros
  from spend_rollup_daily_batch
  where day >= %(month)s and day < %(end_day)s
  group by batch_id
) r
left join batches b on r.dimension = 'batch' and b.id = r.batch_id;

-- name: report_month_upsert
insert into spend_report_months (month, state, computed_at, finalized_at, generations,
                                 cost_micros, open_estimate_micros, snapshot_at,
                                 max_generation_id, computed_micros, billed_generations,
                                 fal_billed_micros, billed_difference_micros)
select %(month)s, %(state)s, %(computed_at)s,
       case when %(state)s = 'final' then %(computed_at)s end,
       coalesce(sum(generations), 0), coalesce(sum(cost_micros), 0),
       coalesce(sum(open_estimate_micros), 0), %(snapshot_at)s, %(max_generation_id)s,
       coalesce(sum(computed_micros), 0), coalesce(sum(billed_generations), 0),
       case when sum(billed_generations) > 0 then sum(fal_billed_micros) end,
       case when sum(billed_generations) > 0
            then sum(fal_billed_micros) - sum(billed_computed_micros) end
from spend_rollup_daily
where day >= %(month)s and day < %(end_day)s
on conflict (month) do update
  set state = excluded.state, computed_at = excluded.computed_at,
      -- finalized once: a rebuild of a final month keeps when it was first finalized
      finalized_at = coalesce(spend_report_months.finalized_at, excluded.finalized_at),
      generations = excluded.generations, cost_micros = excluded.cost_micros,
      open_estimate_micros = excluded.open_estimate_micros,
      snapshot_at = excluded.snapshot_at, max_generation_id = excluded.max_generation_id,
      computed_micros = excluded.computed_micros,
      billed_generations = excluded.billed_generations,
      fal_billed_micros = excluded.fal_billed_micros,
      billed_difference_micros = excluded.billed_difference_micros
returning month, state, computed_at, finalized_at, generations, cost_micros,
          open_estimate_micros, computed_micros, billed_generations, fal_billed_micros,
          billed_difference_micros;

-- name: report_month
select month, state, computed_at, finalized_at, generations, cost_micros, open_estimate_micros,
       snapshot_at, max_generation_id, computed_micros, billed_generations, fal_billed_micros,
       billed_difference_micros
from spend_report_months where month = %(month)s;

-- name: mark_days_unsettled
update spend_rollup_days set settled = false where day = any(%(days)s::date[]);

-- name: monthly_by_user
select * from spend_monthly_by_user where month = %(month)s
order by cost_micros desc, user_id;

-- name: monthly_by_endpoint
select * from spend_monthly_by_endpoint where month = %(month)s
order by cost_micros desc, endpoint;

-- name: monthly_by_batch
select * from spend_monthly_by_batch where month = %(month)s
order by cost_micros desc, batch_id nulls last;

-- name: daily_for_month
select * from spend_daily where month = %(month)s order by day, endpoint;

-- name: ledger_month_facts
-- The ledger's own figures for a month in one scan, by user, endpoint, status and whether
-- the row is unpriced; the checks and the CLI fold them into by-user and by-endpoint rows.
-- `changed_after` marks groups with a row written after a report's snapshot (newer id, or
-- updated since a little before the snapshot began): figures a report could not have seen.
select user_id, endpoint, status::text as status,
       (status = 'completed' and cost_basis in ('unpriced', 'none')) as unpriced,
       count(*)::int as generations,
       coalesce(sum(billed_seconds), 0) as billed_seconds,
       coalesce(sum(cost_micros), 0)::bigint as cost_micros,
       coalesce(sum(coalesce(computed_cost_micros, cost_micros)), 0)::bigint as computed_micros,
       count(fal_billed_micros)::int as billed_generations,
       coalesce(sum(fal_billed_micros), 0)::bigint as fal_billed_micros,
       coalesce(sum(coalesce(computed_cost_micros, cost_micros))
                filter (where fal_billed_micros is not null), 0)::bigint
         as billed_computed_micros,
       bool_or(id > %(max_generation_id)s
               or updated_at > %(snapshot_at)s::timestamptz - %(margin)s::interval)
         as changed_after
from generations
where created_at >= %(start)s and created_at < %(end)s
group by 1, 2, 3, 4;

-- name: ledger_month_by_batch
select bi.batch_id, b.source,
       count(*)::int as generations,
       count(*) filter (where g.status = 'completed')::int as completed,
       count(*) filter (where g.status = 'failed')::int as failed,
       count(*) filter (where g.status = 'canceled')::int as canceled,
       count(*) filter (where g.status in ('submitted', 'in_progress'))::int as open,
       count(*) filter (where g.status = 'completed'
                        and g.cost_basis in ('unpriced', 'none'))::int as unpriced,
       coalesce(sum(g.billed_seconds) filter (where g.status = 'completed'), 0)
         as billed_seconds,
       coalesce(sum(g.cost_micros) filter (where g.status = 'completed'), 0)::bigint
         as cost_micros,
       coalesce(sum(g.cost_micros) filter (where g.status in ('submitted', 'in_progress')),
                0)::bigint as open_estimate_micros,
       coalesce(sum(bi.estimate_micros), 0)::bigint as submit_estimate_micros,
       coalesce(sum(coalesce(g.computed_cost_micros, g.cost_micros))
                filter (where g.status = 'completed'), 0)::bigint as computed_micros,
       (count(g.fal_billed_micros) filter (where g.status = 'completed'))::int
         as billed_generations,
       coalesce(sum(g.fal_billed_micros) filter (where g.status = 'completed'), 0)::bigint
         as fal_billed_micros,
       coalesce(sum(coalesce(g.computed_cost_micros, g.cost_micros))
                filter (where g.status = 'completed' and g.fal_billed_micros is not null),
                0)::bigint as billed_computed_micros
from generations g
left join batch_items bi on bi.id = g.batch_item_id
left join batches b on b.id = bi.batch_id
where g.created_at >= %(start)s and g.created_at < %(end)s
group by bi.batch_id, b.source;

-- name: unpriced_completed_in_month
select request_id, endpoint, cost_basis, created_at
from generations
where created_at >= %(start)s and created_at < %(end)s
  and status = 'completed' and cost_basis in ('unpriced', 'none')
order by created_at, request_id
limit %(limit)s;

-- name: stuck_open_in_month
-- Open for more than the limit, as of %(as_of)s (served by the open rows' partial index).
select request_id, endpoint, status::text as status, created_at
from generations
where status in ('submitted', 'in_progress')
  and created_at >= %(start)s and created_at < %(end)s
  and created_at < %(as_of)s::timestamptz - %(max_open)s::interval
order by created_at, request_id
limit %(limit)s;

-- name: stuck_open_count
select count(*)::int as stuck
from generations
where status in ('submitted', 'in_progress')
  and created_at >= %(start)s and created_at < %(end)s
  and created_at < %(as_of)s::timestamptz - %(max_open)s::interval;

-- name: archive_failures_in_month
-- failed: the copy could not be made; lost: fal's copy was gone before we made ours
select request_id, archive_status, archive_error
from generations
where created_at >= %(start)s and created_at < %(end)s
  and archive_status in ('failed', 'lost')
order by created_at, request_id
limit %(limit)s;

-- name: archive_failure_count
select count(*) filter (where archive_status = 'failed')::int as failed,
       count(*) filter (where archive_status = 'lost')::int as lost
from generations
where created_at >= %(start)s and created_at < %(end)s
  and archive_status in ('failed', 'lost');

-- name: report_month_changes
-- What the triggers of 096_closed_months_marked_changed.sql recorded for a month that has
-- ended: how many writing statements changed it, when, and how many the last rebuild saw.
select month, changes, first_changed_at, last_changed_at, rebuilt_changes, rebuilt_at,
       changes > rebuilt_changes as changed
from spend_report_changes where month = %(month)s;

-- name: report_month_rebuilt
-- A rebuild saw every change up to %(changes)s (counted in its snapshot); a change
-- committed after that snapshot counts higher and keeps the month changed.
update spend_report_changes
   set rebuilt_changes = greatest(rebuilt_changes, %(changes)s), rebuilt_at = %(rebuilt_at)s
 where month = %(month)s;

-- name: report_months_changed
-- Months with a report whose ledger changed since their last rebuild, oldest first.
select c.month, c.changes, c.first_changed_at, c.last_changed_at, m.state, m.finalized_at
from spend_report_changes c
join spend_report_months m on m.month = c.month
where c.changes > c.rebuilt_changes
order by c.month;

-- name: focus_rows_for_month
-- One FOCUS cost row per completed generation of the month (the generations the report
-- tables' cost_micros sums): the ledger's cost (fal's figure once billed), our list figure,
-- the seconds it was priced for, and who asked (user, batch) for the Tags column.
select g.request_id, g.endpoint, g.user_id, bi.batch_id, g.created_at, g.finished_at,
       g.cost_micros, g.cost_basis, coalesce(g.computed_cost_micros, g.cost_micros)
         as list_micros,
       g.billed_seconds, g.fal_billed_micros
from generations g
left join lateral (select b.batch_id from batch_items b where b.id = g.batch_item_id limit 1)
  bi on true
where g.created_at >= %(start)s and g.created_at < %(end)s and g.status = 'completed'
order by g.created_at, g.id;
