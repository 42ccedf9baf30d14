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
-- The grants live in ONE procedure, rq_grant_roles() (sql/functions/roles.sql), that
-- `renderqueue db migrate` calls after every run that changed anything: a function file
-- re-applied with CREATE OR REPLACE (which resets SECURITY DEFINER and its search_path) or
-- a migration that adds a report table gets the rule re-applied. Default privileges cover
-- tables and functions created later by the same migrating role.

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

-- Objects created later (as this same migrating role).
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
