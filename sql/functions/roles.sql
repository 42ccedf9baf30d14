-- THE grants of the three roles (created in sql/schema/90_roles.sql; docs/security.md,
-- "Roles"). `renderqueue db migrate` calls it after every run that changed anything: a
-- function file re-applied with CREATE OR REPLACE resets SECURITY DEFINER and its
-- search_path, and a new table needs its grants.
create or replace procedure rq_grant_roles()
language plpgsql
as $$
declare
  s text := current_schema();
  fn regprocedure;
  tbl text;
begin
  execute format(
    'grant usage on schema %I to renderqueue_receiver, renderqueue_pipeline, renderqueue_analyst', s);
  -- Postgres 14 and older let PUBLIC create in `public`; nobody but the owner may here.
  -- (A migrating admin that does not own the schema cannot revoke: its warning is harmless.)
  begin
    execute format('revoke create on schema %I from public', s);
  exception when insufficient_privilege then
    null;
  end;

  -- Functions: executable by PUBLIC by default in Postgres; here only by the pipeline, and
  -- by the receiver for its entry points below.
  execute format('revoke execute on all functions in schema %I from public', s);
  execute format('grant execute on all functions in schema %I to renderqueue_pipeline', s);
  -- (that includes procedures: this one is the owner's alone)
  revoke execute on procedure rq_grant_roles() from renderqueue_pipeline;

  -- Pipeline: rows, not structure.
  execute format(
    'grant select, insert, update, delete on all tables in schema %I to renderqueue_pipeline', s);
  execute format('grant usage, select on all sequences in schema %I to renderqueue_pipeline', s);
  -- What `migrate` recorded (the runner creates both tables before it calls this): read
  -- by all (the receiver checks the schema is current before it accepts deliveries),
  -- written by the owner alone.
  revoke insert, update, delete on schema_migrations, schema_functions
    from renderqueue_pipeline;
  grant select on schema_migrations, schema_functions
    to renderqueue_receiver, renderqueue_pipeline, renderqueue_analyst;

  -- Write entry points run with a fixed search_path (no table or function of a schema the
  -- caller controls can stand in for ours). The receiver's run as the owner
  -- (SECURITY DEFINER): it must not write the tables directly.
  for fn in
    select p.oid::regprocedure from pg_proc p
    where p.pronamespace = s::regnamespace
      and p.proname in ('rq_record_events', 'rq_record_event')
  loop
    execute format('alter function %s security definer set search_path = %I, pg_temp', fn, s);
    execute format('grant execute on function %s to renderqueue_receiver', fn);
  end loop;
  for fn in
    select p.oid::regprocedure from pg_proc p
    where p.pronamespace = s::regnamespace
      and p.proname in ('rq_apply_events', 'rq_expire_waiting_events')
  loop
    execute format('alter function %s set search_path = %I, pg_temp', fn, s);
  end loop;
  -- The receiver's reads: a late retry's request id, the waiting-event gauges.
  grant select (request_id) on generations to renderqueue_receiver;
  grant select (applied_at, expired_at) on generation_events to renderqueue_receiver;

  -- Analyst: the report, price and billing tables (present and future ones named so).
  for tbl in
    select c.relname from pg_class c
    where c.relnamespace = s::regnamespace
      and c.relkind in ('r', 'p', 'v', 'm')
      and (c.relname like 'spend\_%' or c.relname like 'billing\_%'
           or c.relname like 'fal\_billing\_%' or c.relname in ('prices', 'analyst_generations'))
  loop
    execute format('grant select on %I.%I to renderqueue_analyst', s, tbl);
  end loop;
end
$$;

revoke execute on procedure rq_grant_roles() from public;
