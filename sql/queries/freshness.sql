-- Freshness of the report tables (renderqueue_pipeline/reports/late_changes.py).

-- name: closed_month_high_water
-- A finalized month's report and the oldest high-water mark among its days: anything the
-- ledger wrote after it is a late change the report has not seen.
select r.month, r.computed_at, r.snapshot_at as report_snapshot_at,
       min(d.snapshot_at) as snapshot_at, min(d.max_generation_id) as max_generation_id,
       min(d.max_event_id) as max_event_id
from spend_report_months r
join spend_rollup_days d on d.day >= r.month and d.day < (r.month + interval '1 month')::date
where r.month = %(month)s and r.state = 'final'
group by r.month, r.computed_at, r.snapshot_at;
