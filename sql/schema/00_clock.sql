-- The ledger's clock, injectable for tests that cross month ends. Defined here, before
-- the tables, because their defaults read it.
--
-- `rq_now()` is `now()` unless the session sets `renderqueue.now` (for example through the
-- connection's `options=-c renderqueue.now=2026-01-31T23:59:59Z`, or `set_config`), in which
-- case every default and every ledger function that asks "what time is it" gets that moment.
-- Production never sets it. SQL says `rq_now()`, never `now()`, wherever the moment decides
-- money or a month (created_at, finished_at, admission, reports).
--
-- `generations.created_at` keeps the seed article's `default now()` (the schema is the
-- contract); the ledger's own inserts write `created_at = rq_now()` explicitly.

create function rq_now() returns timestamptz
language sql stable parallel safe
as $$
  select coalesce(nullif(current_setting('renderqueue.now', true), '')::timestamptz, now())
$$;
