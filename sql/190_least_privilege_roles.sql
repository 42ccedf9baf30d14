-- Least privilege: three NOLOGIN roles, each with only what its part needs
-- (docs/security.md, "Roles"). Logins are made members with `renderqueue db grant`.
--
--   renderqueue_receiver  the webhook receiver: records and applies events through
--                         rq_record_events (SECURITY DEFINER); reads request ids and the
--                         waiting-event counts; nothing else (no DDL, no budgets, prices,
--                         billing, no direct writes).
--   renderqueue_pipeline  Dagster jobs and the CLI: reads and writes the ledger's rows and
--                         calls its functions; no DDL (no CREATE on the schema, owns nothing).
--   renderqueue_analyst   read-only: the spend report tables, prices, fal's billing tables
--                         and reconciliation, and the `analyst_generations` view.
--
-- Roles are cluster-wide: every database on the server (tests make many) runs this file,
-- and the advisory lock of the migration run is per database, so creating a role tolerates
-- another database's migration creating it at the same moment. Grants are per database.
--
-- The grants live in ONE procedure, rq_grant_roles(), that this file calls and that
-- `renderqueue db migrate` calls again after any run that applied a migration: a later
-- migration that redefines a function with CREATE OR REPLACE (which resets SECURITY
-- DEFINER and its search_path) or adds a report table gets the rule re-applied. Default
-- privileges cover tables and functions created later by the same migrating role.

do $$
declare
  r text;
begin
  foreach r in array array['renderqueue_receiver', 'renderqueue_pipeline', 'renderqueue_analyst'] loop
    if not exists (select 1 from pg_roles where rolname = r) then
      begin
        execute format('create role %I nologin', r);
      exception when duplicate_object or unique_violation then
        null;  -- another database's migration created it first
      end;
    end if;
  end loop;
end
$$;

create view analyst_generations as
select g.id, g.request_id, g.user_id, g.endpoint, g.status, g.cost_cents, g.cost_micros,
       g.cost_basis, g.billed_seconds, g.price_id, bi.batch_id, g.created_at, g.finished_at,
       g.archive_status, g.archive_url, g.archived_at, g.archive_bytes
from generations g
left join batch_items bi on bi.id = g.batch_item_id;

comment on view analyst_generations is
  'One row per generation for analysts: who, which endpoint, status, cost, batch, archive; '
  'without inputs (prompts) and outputs (fal''s URLs).';

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
  revoke insert, update, delete on schema_migrations from renderqueue_pipeline;
  grant select on schema_migrations
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

-- Objects later migrations create (as this same migrating role).
alter default privileges revoke execute on functions from public;
do $$
begin
  execute format('alter default privileges in schema %I grant execute on functions '
                 'to renderqueue_pipeline', current_schema());
  execute format('alter default privileges in schema %I grant select, insert, update, '
                 'delete on tables to renderqueue_pipeline', current_schema());
  execute format('alter default privileges in schema %I grant usage, select on sequences '
                 'to renderqueue_pipeline', current_schema());
end
$$;

call rq_grant_roles();
