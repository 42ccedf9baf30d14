-- The monthly report rows in one table, keyed by (month, dimension, key), written by one
-- GROUPING SETS statement (sql/queries/reports.sql, report_rows_insert); the shape as it
-- is now: sql/schema/70_reports.sql. The four names analysts and the report files use
-- stay, as views over it with the same columns in the same order; the rows of the four
-- tables are moved into it.
--
-- The key is typed, not text: `user_id` for 'user' rows, `endpoint` for 'endpoint' rows,
-- `day` and `endpoint` for 'day' rows, `batch_id` (null: generations submitted one at a
-- time) and its `source` for 'batch' rows; the key columns another dimension does not use
-- are null.

create table spend_report_rows (
  month date not null check (extract(day from month) = 1),
  dimension text not null check (dimension in ('user', 'endpoint', 'batch', 'day')),
  day date,
  user_id bigint,
  endpoint text,
  batch_id bigint,
  source text,
  generations integer not null,
  completed integer not null,
  failed integer not null,
  canceled integer not null,
  open integer not null,
  unpriced integer not null,
  billed_seconds numeric not null,
  cost_micros bigint not null,
  cost_cents bigint not null,
  micros_per_completed_second numeric,
  open_estimate_micros bigint not null,
  -- batch rows only: the estimates recorded at submit, and how far the spend ran from them
  submit_estimate_micros bigint,
  cost_minus_estimate_micros bigint,
  computed_micros bigint not null,
  billed_generations integer not null,
  fal_billed_micros bigint,
  billed_difference_micros bigint,
  computed_at timestamptz not null,
  check ((dimension = 'user') = (user_id is not null)),
  check ((dimension = 'day') = (day is not null)),
  check ((dimension = 'batch') = (submit_estimate_micros is not null)),
  check (dimension in ('endpoint', 'day') = (endpoint is not null))
);
create unique index spend_report_rows_key
  on spend_report_rows (month, dimension, day, user_id, endpoint, batch_id) nulls not distinct;

insert into spend_report_rows (month, dimension, user_id, generations, completed, failed,
                               canceled, open, unpriced, billed_seconds, cost_micros,
                               cost_cents, micros_per_completed_second, open_estimate_micros,
                               computed_micros, billed_generations, fal_billed_micros,
                               billed_difference_micros, computed_at)
select month, 'user', user_id, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents, micros_per_completed_second,
       open_estimate_micros, computed_micros, billed_generations, fal_billed_micros,
       billed_difference_micros, computed_at
from spend_monthly_by_user;

insert into spend_report_rows (month, dimension, endpoint, generations, completed, failed,
                               canceled, open, unpriced, billed_seconds, cost_micros,
                               cost_cents, micros_per_completed_second, open_estimate_micros,
                               computed_micros, billed_generations, fal_billed_micros,
                               billed_difference_micros, computed_at)
select month, 'endpoint', endpoint, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents, micros_per_completed_second,
       open_estimate_micros, computed_micros, billed_generations, fal_billed_micros,
       billed_difference_micros, computed_at
from spend_monthly_by_endpoint;

insert into spend_report_rows (month, dimension, batch_id, source, generations, completed,
                               failed, canceled, open, unpriced, billed_seconds, cost_micros,
                               cost_cents, micros_per_completed_second, open_estimate_micros,
                               submit_estimate_micros, cost_minus_estimate_micros,
                               computed_micros, billed_generations, fal_billed_micros,
                               billed_difference_micros, computed_at)
select month, 'batch', batch_id, source, generations, completed, failed, canceled, open,
       unpriced, billed_seconds, cost_micros, cost_cents, micros_per_completed_second,
       open_estimate_micros, submit_estimate_micros, cost_minus_estimate_micros,
       computed_micros, billed_generations, fal_billed_micros, billed_difference_micros,
       computed_at
from spend_monthly_by_batch;

insert into spend_report_rows (month, dimension, day, endpoint, generations, completed, failed,
                               canceled, open, unpriced, billed_seconds, cost_micros,
                               cost_cents, micros_per_completed_second, open_estimate_micros,
                               computed_micros, billed_generations, fal_billed_micros,
                               billed_difference_micros, computed_at)
select month, 'day', day, endpoint, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents,
       round(cost_micros / nullif(billed_seconds, 0), 3), open_estimate_micros,
       computed_micros, billed_generations, fal_billed_micros, billed_difference_micros,
       computed_at
from spend_daily;

drop table spend_monthly_by_user;
drop table spend_monthly_by_endpoint;
drop table spend_monthly_by_batch;
drop table spend_daily;

-- The analyst-facing names: the columns and their order are the report files' columns
-- (renderqueue_pipeline/reports/figures.py REPORT_COLUMNS; a test compares them). A new
-- figure is appended at the end (`create or replace view` may add columns there).
create view spend_monthly_by_user as
select month, user_id, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents, micros_per_completed_second,
       open_estimate_micros, fal_billed_micros, billed_difference_micros, computed_at,
       computed_micros, billed_generations
from spend_report_rows where dimension = 'user';

create view spend_monthly_by_endpoint as
select month, endpoint, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents, micros_per_completed_second,
       open_estimate_micros, fal_billed_micros, billed_difference_micros, computed_at,
       computed_micros, billed_generations
from spend_report_rows where dimension = 'endpoint';

create view spend_monthly_by_batch as
select month, batch_id, source, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents, micros_per_completed_second,
       open_estimate_micros, submit_estimate_micros, cost_minus_estimate_micros,
       fal_billed_micros, billed_difference_micros, computed_at, computed_micros,
       billed_generations
from spend_report_rows where dimension = 'batch';

create view spend_daily as
select day, month, endpoint, generations, completed, failed, canceled, open, unpriced,
       billed_seconds, cost_micros, cost_cents, open_estimate_micros, computed_at,
       computed_micros, billed_generations, fal_billed_micros, billed_difference_micros
from spend_report_rows where dimension = 'day';

comment on table spend_report_rows is
  'Monthly spend report rows by user, endpoint, batch and day; read them through the views '
  'spend_monthly_by_user, spend_monthly_by_endpoint, spend_monthly_by_batch and spend_daily.';
