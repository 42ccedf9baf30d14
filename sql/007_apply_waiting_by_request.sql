-- Applying waiting events, faster for large sets. `x = any(array)` against a list of
-- thousands scanned the whole list for every row; these functions now join the list
-- instead (one INSERT of 20,000 rows whose events waited took 57 s, now a few seconds on
-- the same machine). A request's waiting events are found by request id alone: whatever
-- event of a request is asked for, all of its waiting events are applied, in arrival
-- order. And an index of the waiting events by id, for apply_waiting_events' chunks.

drop function rq_apply_requests(text[], bigint[]);

-- The fold of rq_next over the stored, still-waiting events of some requests (locked by
-- the caller), in arrival order; then the rows (one UPDATE) and the events (one UPDATE)
-- written, one row per event returned with its outcome ('waiting' while the request has
-- no row).
create function rq_apply_requests(p_request_ids text[])
returns table (event_id bigint, outcome text)
language plpgsql
as $$
declare
  v_request text;
  e generation_events;
  g generations;
  p prices;
  s rq_step;
  v_changed boolean;
  v_rows generations[] := '{}';
  v_ids bigint[] := '{}';
  v_outcomes text[] := '{}';
begin
  foreach v_request in array p_request_ids loop
    g := null;
    p := null;
    select * into g from generations t where t.request_id = v_request for update;
    if g.id is not null then
      select * into p from rq_price_for(g.endpoint, g.inputs, g.created_at);
    end if;
    v_changed := false;
    for e in select * from generation_events x
              where x.request_id = v_request and x.applied_at is null
              order by x.id loop
      event_id := e.id;
      if g.id is null then
        outcome := 'waiting';
        return next;
        continue;
      end if;
      s := rq_next(e, g, p);
      if s.outcome in ('applied', 'conflict') then
        g := s.next;
        v_changed := true;
      end if;
      v_ids := v_ids || e.id;
      v_outcomes := v_outcomes || s.outcome;
      outcome := s.outcome;
      return next;
    end loop;
    if v_changed then
      v_rows := v_rows || g;
    end if;
  end loop;
  perform rq_store_rows(v_rows);
  update generation_events x
     set applied_at = now(), outcome = u.outcome, apply_error = null, apply_failed_at = null
    from unnest(v_ids, v_outcomes) u(id, outcome)
   where x.id = u.id;
end
$$;

-- Apply the waiting events of the requests of `p_event_ids` (all of each request's
-- waiting events), each at most once, in the same lock order as rq_record_events.
-- Returns one row per event: its outcome, 'waiting' while the row still does not exist, or
-- 'error' when applying it failed: the reason is recorded on the event (apply_error) and
-- the other requests' events go on. Requests are tried in groups of 100, one
-- subtransaction each; a group that fails is retried one request per subtransaction to
-- find the culprit (so a large set stays well inside the lock table). Failures of the
-- transaction itself (deadlock, serialization, lock or statement timeout, out of
-- resources, shutdown) are raised, not recorded.
create or replace function rq_apply_events(p_event_ids bigint[])
returns table (event_id bigint, outcome text)
language plpgsql
as $$
declare
  v_requests text[];
  v_group text[];
  v_request text;
  v_ids bigint[];
  v_outcomes text[];
  v_error text;
  v_state text;
  v_from integer := 1;
begin
  v_requests := array(select distinct x.request_id
                        from unnest(p_event_ids) i join generation_events x on x.id = i
                       order by 1);
  perform rq_lock_requests(v_requests);
  while v_from <= cardinality(v_requests) loop
    v_group := v_requests[v_from:v_from + 99];
    v_from := v_from + 100;
    begin
      select array_agg(a.event_id), array_agg(a.outcome) into v_ids, v_outcomes
        from rq_apply_requests(v_group) a;
      return query select u.id, u.outcome from unnest(v_ids, v_outcomes) u(id, outcome);
      continue;
    exception when others then
      get stacked diagnostics v_state = returned_sqlstate;
      if left(v_state, 2) in ('40', '53', '55', '57', '58', 'XX') then
        raise;
      end if;
    end;
    foreach v_request in array v_group loop
      begin
        select array_agg(a.event_id), array_agg(a.outcome) into v_ids, v_outcomes
          from rq_apply_requests(array[v_request]) a;
      exception when others then
        get stacked diagnostics v_state = returned_sqlstate, v_error = message_text;
        if left(v_state, 2) in ('40', '53', '55', '57', '58', 'XX') then
          raise;
        end if;
        v_ids := array(select x.id from generation_events x
                        where x.request_id = v_request and x.applied_at is null
                        order by x.id);
        v_outcomes := array_fill('error'::text, array[cardinality(v_ids)]);
        update generation_events x
           set apply_error = left(v_state || ': ' || v_error, 2000), apply_failed_at = now()
         where x.id = any (v_ids);
      end;
      return query select u.id, u.outcome from unnest(v_ids, v_outcomes) u(id, outcome);
    end loop;
  end loop;
end
$$;

-- One stored event: its outcome ('waiting' while the row does not exist, 'error' when it
-- cannot be applied), or the outcome it was given already.
create or replace function rq_apply_event(p_event_id bigint) returns text
language plpgsql
as $$
declare
  v_outcome text;
begin
  select a.outcome into v_outcome
    from rq_apply_events(array[p_event_id]) a where a.event_id = p_event_id;
  if v_outcome is null then  -- applied before: report what it did
    select x.outcome into v_outcome from generation_events x where x.id = p_event_id;
    if not found then
      raise exception 'rq_apply_event: no event with id %', p_event_id;
    end if;
  end if;
  return v_outcome;
end
$$;

create index generation_events_waiting_id_idx on generation_events (id)
  where applied_at is null;

-- Rule 4's trigger, as in 003_state_machine.sql, joining instead of `= any(array)`.
create or replace function rq_generations_apply_waiting() returns trigger
language plpgsql
as $$
declare
  v_requests text[];
  v_events bigint[];
begin
  v_requests := array(select distinct n.request_id from new_rows n order by 1);
  perform rq_lock_requests(v_requests);
  v_events := array(select e.id
                      from unnest(v_requests) r
                      join generation_events e on e.request_id = r and e.applied_at is null);
  if cardinality(v_events) > 0 then
    perform rq_apply_events(v_events);
  end if;
  return null;
end
$$;
