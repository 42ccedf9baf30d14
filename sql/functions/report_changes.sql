-- A closed month's report is rebuilt when the ledger behind it changes: every change to a
-- generation of a month that has ended (by the ledger's clock, rq_now()) is recorded in
-- spend_report_changes (sql/schema/70_reports.sql) IN THE SAME TRANSACTION, by these
-- triggers, so every writer is covered: our functions, the billing apply, the seed
-- article's raw statements, a DELETE, and a batch item whose estimate or batch changes
-- under a generation (the by-batch report reads both). Only months that have ended are
-- recorded: the current month's hot path pays one comparison per row (the triggers' WHEN
-- clause) and nothing else.

-- Record a change to each ended month among `p_months` (UTC months, any order). Runs as
-- the table's owner, so a writer whose role may change generations but not this table
-- (a narrow database role) still records its change rather than failing its write.
create or replace function rq_mark_months_changed(p_months date[]) returns void
language sql
security definer
set search_path from current
as $$
  insert into spend_report_changes as c (month, changes, first_changed_at, last_changed_at)
  select m, 1, rq_now(), rq_now()
  from (select distinct m from unnest(p_months) as u(m)
        where m is not null
          and m < date_trunc('month', rq_now() at time zone 'UTC')::date
        order by m) s
  on conflict (month) do update
    set changes = c.changes + 1,
        first_changed_at = case when c.changes > c.rebuilt_changes then c.first_changed_at
                                else excluded.first_changed_at end,
        last_changed_at = excluded.last_changed_at
$$;

create or replace function rq_month_of(p_at timestamptz) returns date
language sql immutable parallel safe
as $$ select date_trunc('month', p_at at time zone 'UTC')::date $$;

-- Whether a moment's UTC month has ended, by the ledger's clock.
create or replace function rq_month_closed(p_at timestamptz) returns boolean
language sql stable parallel safe
as $$ select rq_month_of(p_at) < rq_month_of(rq_now()) $$;

-- Row triggers whose WHEN clause filters first: a write to the current month evaluates
-- one comparison and runs nothing (no transition tables, no function call per statement).
create or replace function rq_generations_mark_months() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'INSERT' then
    perform rq_mark_months_changed(array[rq_month_of(new.created_at)]);
  elsif tg_op = 'DELETE' then
    perform rq_mark_months_changed(array[rq_month_of(old.created_at)]);
  else
    perform rq_mark_months_changed(array[rq_month_of(old.created_at),
                                         rq_month_of(new.created_at)]);
  end if;
  return null;
end
$$;

create or replace trigger generations_mark_months_insert
  after insert on generations
  for each row when (rq_month_closed(new.created_at))
  execute function rq_generations_mark_months();
create or replace trigger generations_mark_months_update
  after update on generations
  for each row when (rq_month_closed(old.created_at) or rq_month_closed(new.created_at))
  execute function rq_generations_mark_months();
create or replace trigger generations_mark_months_delete
  after delete on generations
  for each row when (rq_month_closed(old.created_at))
  execute function rq_generations_mark_months();

-- A batch item's estimate or batch feeds the by-batch report of its generation's month
-- (found through the item's request id: the unique index, never a scan).
create or replace function rq_batch_items_mark_months() returns trigger
language plpgsql
as $$
begin
  perform rq_mark_months_changed(array(
    select rq_month_of(g.created_at) from generations g
    where g.request_id = new.request_id and g.batch_item_id = new.id));
  return null;
end
$$;

create or replace trigger batch_items_mark_months
  after update of estimate_micros, batch_id on batch_items
  for each row
  when (old.estimate_micros is distinct from new.estimate_micros
        or old.batch_id is distinct from new.batch_id)
  execute function rq_batch_items_mark_months();
