-- Spend truth: fal's billing events, the reconciliation of each request with the ledger,
-- and prices kept current from fal's pricing API. Schema in sql/schema/60_billing.sql.
-- Parameters are psycopg named placeholders: %(name)s.

-- name: spend_delete_billing_range
delete from fal_billing_events
where billed_at >= %(start)s and billed_at < %(end)s;

-- name: spend_copy_billing_events
copy fal_billing_events (request_id, endpoint, billed_at, output_units, unit_price,
                         percent_discount, cost_nano_usd)
from stdin;

-- name: spend_insert_billing_event
insert into fal_billing_events (request_id, endpoint, billed_at, output_units, unit_price,
                                percent_discount, cost_nano_usd)
values (%s, %s, %s, %s, %s, %s, %s);

-- name: spend_billing_range_totals
select count(*) as events, count(distinct request_id) as requests,
       coalesce(sum(cost_nano_usd), 0)::bigint as nano_usd
from fal_billing_events
where billed_at >= %(start)s and billed_at < %(end)s;

-- name: spend_delete_reconciliation_range
with days as (
  delete from billing_reconciliation_days
  where day >= %(start_day)s and day < %(end_day)s
)
delete from billing_reconciliation
where day >= %(start_day)s and day < %(end_day)s;

-- The reconciliation hashes a range's billing events: room to keep that in memory, for
-- its own transaction only.
-- name: billing_check_work_mem
set local work_mem = '64MB';

-- Classify every request of [start, end): the generations created in the range, each
-- matched with its billing events BY REQUEST ID (whenever fal stamped them, up to 31 days
-- either side of the range: a bill may precede our row, e.g. fal finished at 23:59:59.97
-- and the row was written at 00:00:00.02), and the billing events stamped in the range
-- for requests the ledger does not know at all.
-- A request the ledger does not know is counted on each UTC day fal billed it, with the
-- events of that day only: however a month is split into ranges, each billing event is
-- counted once (a request billed on the 10th and the 12th is two findings, one a day).
-- It answers both: a row per (day, outcome) for the requests that are fine ('matched',
-- 'no_charge'), and a row per request (and day), with the detail and the reason, for
-- every request that needs a look. Two steps, so that the pass over every request stays
-- narrow:
-- 1. t: one pass over the range (a hash full join of the generations with the billing
--    events summed per request), carrying only what the outcome needs, hashed into
--    (day, outcome, finding) groups: a few hundred groups, whatever the range's size.
-- 2. the detail of each finding (endpoint, prices, units, reason...) is looked up by its
--    request id afterwards (an unknown request's events summed per billing day: d); the
--    laterals with `limit 1` / an aggregate stay index lookups per finding (the planner
--    cannot know how few there are).
-- The full join cannot run in parallel (its inner side is an aggregate), so `offset 0`
-- fences k: each request's outcome is computed once, not once per use.
-- name: spend_classify_range
with g as (
  select g.request_id, g.status, g.created_at, g.finished_at,
         case when g.status = 'completed'
              then coalesce(g.computed_cost_micros, g.cost_micros) else 0 end as our_micros
  from generations g
  where g.created_at >= %(start)s and g.created_at < %(end)s
),
b as (
  select e.request_id, min(e.billed_at) as billed_at, sum(e.cost_nano_usd)::bigint as nanos,
         bool_or(e.billed_at >= %(start)s and e.billed_at < %(end)s) as in_range
  from fal_billing_events e
  where e.billed_at >= %(start)s::timestamptz - interval '31 days'
    and e.billed_at < %(end)s::timestamptz + interval '31 days'
  group by e.request_id
),
k as (
  select
    -- an unknown request's days are its billing days in the range (d, below)
    (g.created_at at time zone 'UTC')::date as day,
    coalesce(g.request_id, b.request_id) as request_id,
    -- the outcome as a number while millions of rows are grouped (named in t below):
    -- 1 matched, 2 no_charge (the two that are fine), 3 billed_not_completed,
    -- 4 not_billed, 5 awaiting_billing, 6 unknown_to_ledger, 7 amount_differs
    case
      when g.request_id is null then 6
      when b.request_id is null then
        case when g.status <> 'completed' then 2
             when coalesce(g.finished_at, g.created_at)
                  < %(now)s::timestamptz - %(grace)s::interval then 4
             else 5 end
      when g.status <> 'completed' then 3
      when abs(rq_nanos_to_micros(b.nanos) - g.our_micros) <= 1 then 1
      else 7
    end as code,
    g.our_micros, rq_nanos_to_micros(b.nanos) as fal_micros
  from g
  full join b on b.request_id = g.request_id
  where g.request_id is not null
     or (b.in_range
         and not exists (select 1 from generations x where x.request_id = b.request_id))
  offset 0  -- a fence: each request's outcome is computed once, not once per use
),
t as (
  select day,
         (array['matched', 'no_charge', 'billed_not_completed', 'not_billed',
                'awaiting_billing', 'unknown_to_ledger', 'amount_differs'])[code] as outcome,
         case when code > 2 then request_id end as finding,
         count(*) as requests,
         coalesce(sum(our_micros), 0)::bigint as our_micros_total,
         coalesce(sum(fal_micros), 0)::bigint as fal_micros_total
  from k
  group by day, code, finding
)
-- a finding is a group of one: these are its values (null for the other groups)
select coalesce(d.day, t.day) as day, t.outcome, t.finding as request_id, t.requests,
       t.our_micros_total, coalesce(d.fal_micros, t.fal_micros_total) as fal_micros_total,
       coalesce(g.endpoint, e.endpoint) as endpoint,
       case t.outcome
         when 'amount_differs' then coalesce(nullif(concat_ws(', ',
           case when e.units is distinct from g.billed_seconds then 'units' end,
           case when e.unit_price * 1000000 is distinct from g.micros_per_second
                then 'price' end,
           case when coalesce(e.discount, 0) <> 0 then 'discount' end), ''), 'other')
         when 'billed_not_completed' then
           case when g.status in ('submitted', 'in_progress') then 'open'
                else g.status::text end
         when 'not_billed' then 'completed, no billing event after the grace period'
       end as reason,
       g.status::text as ledger_status, g.our_micros,
       rq_nanos_to_micros(e.nanos) as fal_micros, e.nanos as fal_nano_usd,
       g.billed_seconds as our_seconds, e.units as fal_units,
       g.micros_per_second as our_micros_per_second,
       e.unit_price * 1000000 as fal_micros_per_unit, e.discount as percent_discount,
       g.batch_item_id, g.created_at, e.billed_at
from t
left join lateral (
  -- a request the ledger does not know: one row per UTC day fal billed it in the range
  select (e.billed_at at time zone 'UTC')::date as day,
         rq_nanos_to_micros(sum(e.cost_nano_usd)::bigint) as fal_micros
  from fal_billing_events e
  where t.outcome = 'unknown_to_ledger' and e.request_id = t.finding
    and e.billed_at >= %(start)s and e.billed_at < %(end)s
  group by 1
) d on true
left join lateral (
  select g.endpoint, g.status, g.billed_seconds, g.batch_item_id, g.created_at,
         case when g.status = 'completed'
              then coalesce(g.computed_cost_micros, g.cost_micros) else 0 end as our_micros,
         p.micros_per_second
  from generations g
  left join prices p on p.id = g.price_id
  where g.request_id = t.finding
  limit 1
) g on true
left join lateral (
  -- a known request: its events across the matching window; an unknown one: that day's
  select min(e.endpoint) as endpoint, min(e.billed_at) as billed_at,
         sum(e.output_units) as units, max(e.unit_price) as unit_price,
         max(e.percent_discount) as discount, sum(e.cost_nano_usd)::bigint as nanos
  from fal_billing_events e
  where e.request_id = t.finding
    and case when d.day is not null
             then e.billed_at >= d.day::timestamp at time zone 'UTC'
                  and e.billed_at < (d.day + 1)::timestamp at time zone 'UTC'
             else e.billed_at >= %(start)s::timestamptz - interval '31 days'
                  and e.billed_at < %(end)s::timestamptz + interval '31 days' end
) e on true;

-- name: spend_copy_reconciliation
copy billing_reconciliation (day, request_id, endpoint, outcome, reason, ledger_status,
                             our_micros, fal_micros, fal_nano_usd, our_seconds, fal_units,
                             our_micros_per_second, fal_micros_per_unit, percent_discount,
                             batch_item_id, created_at, billed_at)
from stdin;

-- name: spend_insert_reconciliation_day
insert into billing_reconciliation_days (day, outcome, requests, our_micros, fal_micros)
values (%(day)s, %(outcome)s, %(requests)s, %(our_micros)s, %(fal_micros)s);

-- A billed request the ledger does not know: attribute it to the batch item that asked for
-- it when one can be found (same request id, or an item of the same endpoint whose submit
-- outcome stayed unknown, made in the day before fal's timestamp; the nearest wins).
-- name: spend_attribute_unknown
update billing_reconciliation r
   set batch_item_id = a.id,
       reason = a.reason
  from billing_reconciliation u
  cross join lateral (
    select bi.id,
           case when bi.request_id = u.request_id
                then format('batch item %%s (state %%s): same request id', bi.id, bi.state)
                else format('batch item %%s (state %%s): same endpoint, submitted %%s before',
                            bi.id, bi.state,
                            date_trunc('second', u.billed_at - bi.created_at)) end as reason
    from batch_items bi
    where bi.request_id = u.request_id
       or (bi.state in ('unknown', 'pending')
           and bi.endpoint = u.endpoint
           and bi.created_at <= u.billed_at
           and bi.created_at > u.billed_at - interval '1 day')
    order by bi.request_id = u.request_id desc nulls last, bi.created_at desc
    limit 1
  ) a
 where u.day >= %(start_day)s and u.day < %(end_day)s
   and u.outcome = 'unknown_to_ledger'
   and r.day = u.day and r.request_id = u.request_id;

-- name: spend_mark_unattributed
update billing_reconciliation
   set reason = 'no ledger record or batch item: another system using the key?'
 where day >= %(start_day)s and day < %(end_day)s
   and outcome = 'unknown_to_ledger' and reason is null;

-- fal's figure becomes the cost of each billed, completed generation made in the range
-- (cost_basis 'billed'); our own figure and its basis are kept once, in
-- computed_cost_micros / computed_cost_basis. Reads the billing events themselves, so it
-- holds for matched and differing requests alike; matched by request id over the same
-- window as spend_classify_range (a bill stamped before our row's creation counts).
-- name: spend_apply_billed
with b as (
  select e.request_id, min(e.billed_at) as billed_at, sum(e.cost_nano_usd)::bigint as nanos
  from fal_billing_events e
  where e.billed_at >= %(start)s::timestamptz - interval '31 days'
    and e.billed_at < %(end)s::timestamptz + interval '31 days'
  group by e.request_id
)
update generations g
   set computed_cost_micros = coalesce(g.computed_cost_micros, g.cost_micros),
       computed_cost_basis = coalesce(g.computed_cost_basis, g.cost_basis),
       cost_micros = rq_nanos_to_micros(b.nanos),
       cost_basis = 'billed',
       fal_billed_micros = rq_nanos_to_micros(b.nanos),
       fal_billed_nano_usd = b.nanos,
       fal_billed_at = b.billed_at
  from b
 where g.request_id = b.request_id
   and g.created_at >= %(start)s and g.created_at < %(end)s
   and g.status = 'completed'
   and (g.cost_basis <> 'billed' or g.fal_billed_nano_usd is distinct from b.nanos);

-- name: spend_outcomes
select outcome, sum(requests)::bigint as requests, sum(our_micros)::bigint as our_micros,
       sum(fal_micros)::bigint as fal_micros
from billing_reconciliation_days
where day >= %(start_day)s and day < %(end_day)s
group by outcome
order by outcome;

-- name: spend_largest_differences
select day, request_id, endpoint, outcome, reason, ledger_status, our_micros, fal_micros,
       coalesce(fal_micros, 0) - coalesce(our_micros, 0) as difference_micros,
       our_seconds, fal_units, our_micros_per_second, fal_micros_per_unit, percent_discount,
       batch_item_id
from billing_reconciliation
where day >= %(start_day)s and day < %(end_day)s
  and outcome in ('amount_differs', 'billed_not_completed', 'not_billed', 'unknown_to_ledger')
order by abs(coalesce(fal_micros, 0) - coalesce(our_micros, 0)) desc, request_id
limit %(limit)s;

-- name: spend_endpoints_in_use
select endpoint from prices
union
select distinct endpoint from generations
where created_at >= %(since)s;

-- The latest row of each price key (resolution, audio) of an endpoint at a moment.
-- name: spend_current_price_rows
select distinct on (resolution, with_audio)
       id, endpoint, resolution, with_audio, micros_per_second, base_micros, base_seconds,
       default_seconds, default_resolution, effective_from, price_version, source
from prices
where endpoint = %(endpoint)s and effective_from <= %(at)s
order by resolution, with_audio, effective_from desc;

-- The row the pricing API's single figure is compared with: default resolution, audio on.
-- name: spend_reference_price
select id, micros_per_second, resolution, with_audio
from rq_price_for(%(endpoint)s, '{}'::jsonb, %(at)s);

-- name: spend_insert_price
insert into prices (endpoint, resolution, with_audio, micros_per_second, base_micros,
                    base_seconds, default_seconds, default_resolution, effective_from,
                    price_version, source)
values (%(endpoint)s, %(resolution)s, %(with_audio)s, %(micros_per_second)s,
        %(base_micros)s, %(base_seconds)s, %(default_seconds)s, %(default_resolution)s,
        %(effective_from)s, %(price_version)s, %(source)s)
on conflict do nothing
returning id;

-- Our totals per user (tag_key 'rq_user') or per batch ('rq_batch') beside fal's usage by
-- that tag (fal's groups passed in as arrays: tag value, requests, nano-dollars), one row
-- per value either side has. Ours: the generations created in [start, end) that the
-- ledger says completed, at our own figure (computed_cost_micros when fal's bill replaced
-- cost_micros). fal's: nano-dollars summed per value, then rounded once, half up. A null
-- value is "no such tag" at fal and "not in a batch" in the ledger. `differs` allows 1
-- micro-dollar per request (ours are rounded per request, fal's once per group).
-- name: spend_compare_usage_by_tag
with ours as (
  select case %(tag_key)s when 'rq_user' then g.user_id::text
                          when 'rq_batch' then bi.batch_id::text end as tag_value,
         count(*) as requests,
         sum(coalesce(g.computed_cost_micros, g.cost_micros))::bigint as micros
  from generations g
  left join batch_items bi on bi.id = g.batch_item_id
  where g.status = 'completed' and g.created_at >= %(start)s and g.created_at < %(end)s
  group by 1
),
fals as (
  select f.tag_value, sum(f.requests)::bigint as requests,
         rq_nanos_to_micros(sum(f.nanos)::bigint) as micros
  from unnest(%(tag_values)s::text[], %(requests)s::bigint[], %(nanos)s::bigint[])
       as f (tag_value, requests, nanos)
  group by 1
)
select coalesce(o.tag_value, f.tag_value) as tag_value,
       coalesce(o.requests, 0) as our_requests, coalesce(o.micros, 0) as our_micros,
       coalesce(f.requests, 0) as fal_requests, coalesce(f.micros, 0) as fal_micros,
       coalesce(f.micros, 0) - coalesce(o.micros, 0) as difference_micros,
       abs(coalesce(f.micros, 0) - coalesce(o.micros, 0))
         > greatest(coalesce(o.requests, 0), coalesce(f.requests, 0), 1) as differs
from ours o
-- tag values of ours are decimal ids: '' stands for "none" on both sides
full join fals f on coalesce(f.tag_value, '') = coalesce(o.tag_value, '')
order by abs(coalesce(f.micros, 0) - coalesce(o.micros, 0)) desc, 1;
