-- Budget alerts (sql/schema/50_budgets.sql, docs/alerts.md). The figures come from
-- user_month_figures (batch.sql): one definition of spent + in flight.

-- name: alert_clock
-- the ledger's clock (rq_now, injectable) and its UTC month: the month being evaluated
select rq_now() as now, date_trunc('month', rq_now() at time zone 'utc')::date as month;

-- name: user_alert_percents
select alert_percents from user_budgets where user_id = %(user_id)s and month = %(month)s;

-- name: set_user_alert_percents
update user_budgets set alert_percents = %(percents)s
where user_id = %(user_id)s and month = %(month)s
returning user_id, month, limit_micros, alert_percents;

-- name: insert_budget_alert
-- the decision: only the first evaluation of (user, month, threshold) gets a row back
insert into budget_alerts (user_id, month, threshold_percent, limit_micros, limit_source,
                           actual_micros, in_flight_micros, created_at, next_attempt_at)
values (%(user_id)s, %(month)s, %(threshold_percent)s, %(limit_micros)s, %(limit_source)s,
        %(actual_micros)s, %(in_flight_micros)s, rq_now(), rq_now())
on conflict on constraint budget_alerts_once do nothing
returning id;

-- name: claim_due_budget_alert
-- one undelivered alert that is due, locked until its transaction ends; another process
-- delivering at the same moment skips it
select id, user_id, month, threshold_percent, limit_micros, limit_source, actual_micros,
       in_flight_micros, attempts, created_at
from budget_alerts
where delivered_at is null and next_attempt_at <= rq_now() and not (id = any(%(skip_ids)s))
order by id
limit 1
for update skip locked;

-- name: mark_budget_alert_delivered
update budget_alerts
set delivered_at = rq_now(), last_attempt_at = rq_now(),
    attempts = attempts + %(attempts)s
where id = %(id)s;

-- name: mark_budget_alert_failed
update budget_alerts
set attempts = attempts + %(attempts)s, last_attempt_at = rq_now(), last_error = %(error)s,
    next_attempt_at = rq_now() + make_interval(secs => %(retry_after_s)s)
where id = %(id)s
returning attempts, next_attempt_at;

-- name: budget_alerts_for_month
select id, user_id, month, threshold_percent, limit_micros, limit_source, actual_micros,
       in_flight_micros, created_at, attempts, last_attempt_at, last_error, next_attempt_at,
       delivered_at
from budget_alerts
where month = %(month)s
order by user_id, threshold_percent;
