-- Views for analysts: live spend by user-month and endpoint-month, and fal's bill where it
-- differs from ours. Read-only; the analyst role reads them (rq_grant_roles grants every
-- relation named spend_* and billing_*). docs/reports.md "Views for analysts".
--
-- The monthly report tables are the settled, materialized figures; these views read the
-- ledger as it is now, with the same definitions: a generation belongs to the UTC month of
-- its created_at, cost is the completed generations' cost_micros (fal's figure once fal
-- billed the request), open = submitted or in_progress.

create view spend_by_user_month as
select date_trunc('month', g.created_at at time zone 'UTC')::date as month,
       g.user_id,
       count(*) as generations,
       count(*) filter (where g.status = 'completed') as completed,
       count(*) filter (where g.status = 'failed') as failed,
       count(*) filter (where g.status = 'canceled') as canceled,
       count(*) filter (where g.status in ('submitted', 'in_progress')) as open,
       coalesce(sum(g.billed_seconds) filter (where g.status = 'completed'), 0)
         as billed_seconds,
       coalesce(sum(g.cost_micros) filter (where g.status = 'completed'), 0) as cost_micros,
       round(coalesce(sum(g.cost_micros) filter (where g.status = 'completed'), 0)
             / 1000000.0, 6) as cost_usd
from generations g
group by 1, 2;

comment on view spend_by_user_month is
  'Live spend per user and UTC month (completed generations'' cost; fal''s figure once billed).';

create view spend_by_endpoint_month as
select date_trunc('month', g.created_at at time zone 'UTC')::date as month,
       g.endpoint,
       count(*) as generations,
       count(*) filter (where g.status = 'completed') as completed,
       count(*) filter (where g.status = 'failed') as failed,
       count(*) filter (where g.status = 'canceled') as canceled,
       count(*) filter (where g.status in ('submitted', 'in_progress')) as open,
       coalesce(sum(g.billed_seconds) filter (where g.status = 'completed'), 0)
         as billed_seconds,
       coalesce(sum(g.cost_micros) filter (where g.status = 'completed'), 0) as cost_micros,
       round(coalesce(sum(g.cost_micros) filter (where g.status = 'completed'), 0)
             / 1000000.0, 6) as cost_usd
from generations g
group by 1, 2;

comment on view spend_by_endpoint_month is
  'Live spend per endpoint and UTC month (completed generations'' cost; fal''s figure once billed).';

create view billing_differences as
select r.day, date_trunc('month', r.day)::date as month, r.request_id, r.endpoint,
       r.outcome, r.reason, r.ledger_status, r.our_micros, r.fal_micros,
       coalesce(r.fal_micros, 0) - coalesce(r.our_micros, 0) as difference_micros,
       r.our_seconds, r.fal_units, r.created_at, r.billed_at
from billing_reconciliation r
where r.outcome <> 'matched';

comment on view billing_differences is
  'Every request whose bill from fal differs from the ledger (or has no counterpart), by day; '
  'difference = fal minus ours.';
