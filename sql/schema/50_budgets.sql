-- Per-user monthly budgets (month = first day of the month, UTC) and the alerts that fire
-- once (docs/alerts.md).
--
-- `user_budgets.alert_percents`: the user-month's own thresholds (percent of the budget);
-- null means RENDERQUEUE_BUDGET_ALERT_PERCENTS (default 50,80,100).
create table user_budgets (
  user_id bigint not null,
  month date not null check (extract(day from month) = 1),
  limit_micros bigint not null check (limit_micros >= 0),
  alert_percents integer[]
    check (alert_percents is null
           or (cardinality(alert_percents) between 1 and 10
               and 1 <= all(alert_percents) and 1000 >= all(alert_percents)
               and array_position(alert_percents, null) is null)),
  primary key (user_id, month)
);

-- `budget_alerts` is an outbox: the evaluation that decides a threshold was crossed inserts
-- its row (the figures it saw) in the same transaction, and the unique (user, month,
-- threshold) key lets only one insert win however many sensor ticks, CLI runs or processes
-- evaluate at once. Delivery then claims a row (FOR UPDATE SKIP LOCKED), posts it, and
-- marks it delivered in that transaction; a failed post records the attempt, the error
-- (redacted: never the webhook URL) and when to try again.

create table budget_alerts (
  id bigint generated always as identity primary key,
  user_id bigint not null,
  month date not null check (extract(day from month) = 1),
  threshold_percent integer not null check (threshold_percent between 1 and 1000),
  limit_micros bigint not null check (limit_micros >= 0),
  limit_source text not null check (limit_source in ('user_budgets', 'default')),
  actual_micros bigint not null,
  in_flight_micros bigint not null,
  created_at timestamptz not null default rq_now(),
  attempts integer not null default 0 check (attempts >= 0),
  last_attempt_at timestamptz,
  last_error text,
  next_attempt_at timestamptz not null default rq_now(),
  delivered_at timestamptz,
  constraint budget_alerts_once unique (user_id, month, threshold_percent)
);
create index budget_alerts_undelivered_idx on budget_alerts (next_attempt_at)
  where delivered_at is null;

comment on table budget_alerts is
  'One row per user, month and budget threshold crossed (spent + in flight): what was '
  'decided, with the figures seen, and its delivery to RENDERQUEUE_ALERT_WEBHOOK_URL.';
