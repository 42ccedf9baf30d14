-- The month-end forecast's named queries (renderqueue_pipeline/reports/forecast.py).
-- Spend is what the monthly reports count: completed generations' cost_micros, by the UTC
-- created_at. Every bound is passed in (%(now)s included), so a forecast is reproducible.

-- name: forecast_facts
-- One pass over [min(month start, now - 7 days), now): per user and endpoint, completed
-- cost in the month so far, completed cost of the last 7 days (the rate, which may reach
-- into the previous month), and open generations' estimates (shown, not forecast).
select g.user_id, g.endpoint,
       coalesce(sum(g.cost_micros) filter (where g.status = 'completed'
                                           and g.created_at >= %(start)s), 0)::bigint
         as month_to_date_micros,
       coalesce(sum(g.cost_micros) filter (where g.status = 'completed'
                                           and g.created_at >= %(rate_start)s), 0)::bigint
         as last_7_days_micros,
       coalesce(sum(g.cost_micros) filter (where g.status in ('submitted', 'in_progress')
                                           and g.created_at >= %(start)s), 0)::bigint
         as in_flight_micros
from generations g
where g.created_at >= least(%(start)s::timestamptz, %(rate_start)s::timestamptz)
  and g.created_at < %(now)s
group by g.user_id, g.endpoint;

-- name: forecast_budgets
-- The month's budget rows (users without one fall back to the default budget, if set).
select user_id, limit_micros from user_budgets where month = %(month)s order by user_id;

-- name: forecast_clock
-- The ledger's clock (rq_now(): a test or the invariant suite may set it).
select rq_now() as now;
