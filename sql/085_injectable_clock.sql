-- One clock for the ledger, injectable for tests that cross month ends.
--
-- `rq_now()` is `now()` unless the session sets `renderqueue.now` (for example through the
-- connection's `options=-c renderqueue.now=2026-01-31T23:59:59Z`, or `set_config`), in which
-- case every default and every ledger function that asks "what time is it" gets that moment.
-- Production never sets it. SQL written from now on says `rq_now()`, never `now()`, wherever
-- the moment decides money or a month (created_at, finished_at, admission, reports).
--
-- `generations.created_at` keeps the seed article's `default now()` (the schema is the
-- contract); the ledger's own inserts write `created_at = rq_now()` explicitly.

create function rq_now() returns timestamptz
language sql stable parallel safe
as $$
  select coalesce(nullif(current_setting('renderqueue.now', true), '')::timestamptz, now())
$$;

alter table generations alter column updated_at set default rq_now();
alter table batches alter column created_at set default rq_now();
alter table batch_items alter column created_at set default rq_now();
alter table batch_items alter column updated_at set default rq_now();
alter table generation_events alter column received_at set default rq_now();
alter table fal_billing_events alter column loaded_at set default rq_now();
