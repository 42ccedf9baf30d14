-- The state machine as a pure function, and a batch writer that runs it over a whole
-- group commit with a fixed number of statements instead of several per event.
--
--   rq_next(event, row, price)  THE state machine: what an event does to a generation.
--                               Pure: it returns the outcome and the row's next state;
--                               it reads and writes nothing.
--   rq_store_rows(rows)         writes next states back (one UPDATE for any number)
--   rq_record_events(events)    the writer: lock, dedupe, fold rq_next over each
--                               request's events in order, store rows and events
--   rq_record_event(...)        one event: rq_record_events with a one-element array
--   rq_apply_event(id)          a stored event that waited for its row, through rq_next
--
-- rq_apply (003), which read and wrote the row itself once per event, is gone.

create type rq_step as (outcome text, next generations);

-- Outcomes: applied | duplicate | stale | conflict.
--   status only moves forward: submitted -> in_progress -> completed | failed | canceled,
--   submitted may jump to a terminal state, a terminal state never changes; a different
--   terminal event for a finished row is kept, marked 'conflict', and flags the row.
--   A completed row whose webhook carried no payload (fal's payload_error) still waits
--   for its output: a later completed event with the payload fills it in.
-- `p` is the price in force for the row (rq_price_for), null when there is none.
create function rq_next(e generation_events, g generations, p prices) returns rq_step
language plpgsql immutable parallel safe
as $$
declare
  n generations := g;
  v_seconds numeric;
begin
  if g.status in ('completed', 'failed', 'canceled')
     and not (g.status = 'completed' and e.kind = 'completed'
              and g.outputs is null and e.payload is not null) then
    if e.kind = g.status::text then
      return row('duplicate', g)::rq_step;
    elsif e.kind = 'in_progress' then
      return row('stale', g)::rq_step;
    end if;
    n.conflict := true;
    return row('conflict', n)::rq_step;
  end if;

  if e.kind = 'in_progress' then
    if g.status <> 'submitted' then
      return row('duplicate', g)::rq_step;
    end if;
    n.status := 'in_progress';
  elsif e.kind = 'completed' and e.payload is null then
    -- Finished, but fal could not serialise the output: the estimate stands until the
    -- reconciler fetches the result (fal keeps it about an hour).
    n.status := 'completed';
    n.finished_at := e.received_at;
    n.error := coalesce(e.error, 'completed without a payload');
  elsif e.kind = 'completed' then
    v_seconds := coalesce(rq_output_seconds(e.payload), rq_requested_seconds(g.inputs),
                          p.default_seconds);
    n.status := 'completed';
    n.outputs := rq_outputs_from_payload(e.payload);
    n.error := null;
    n.finished_at := coalesce(g.finished_at, e.received_at);
    n.cost_basis := case when p.id is null then 'unpriced' else 'actual' end;
    n.price_id := coalesce(p.id, g.price_id);
    n.billed_seconds := v_seconds;
    n.cost_micros := case when p.id is null then g.cost_micros
                          else rq_cost_micros(p, v_seconds) end;
    n.archive_status := case when n.outputs ? 'video_url' then 'pending' else 'none' end;
  else  -- failed or canceled: never charged
    n.status := e.kind::generation_status;
    n.finished_at := e.received_at;
    n.error := left(coalesce(e.error, e.kind)
                    || coalesce(': ' || (e.payload ->> 'detail'), ': ' || e.payload::text, ''),
                    4000);
    n.cost_micros := 0;
    n.cost_basis := 'none';
  end if;
  return row('applied', n)::rq_step;
end
$$;

-- Write the next states rq_next computed (rows locked by the caller). Only the columns the
-- state machine owns; generations_guard still checks every row.
create function rq_store_rows(p_rows generations[]) returns void
language plpgsql
as $$
begin
  update generations t
     set status = n.status, outputs = n.outputs, error = n.error,
         finished_at = n.finished_at, cost_micros = n.cost_micros,
         cost_basis = n.cost_basis, price_id = n.price_id,
         billed_seconds = n.billed_seconds, conflict = n.conflict,
         archive_status = n.archive_status
    from unnest(p_rows) n
   where t.id = n.id;
end
$$;

-- Many events in one statement, for the webhook receiver's group commit, with the same
-- outcome for each event as one call per event in array order would give.
-- p_events is a JSON array of {request_id, source, kind, payload, error,
-- gateway_request_id}; a JSON null payload is stored as SQL null, like a missing one.
-- Duplicates (same dedupe_key as a stored event or an earlier one in the array) are not
-- stored again; other events are stored once, already marked applied, or unapplied
-- ('waiting') while their row does not exist.
drop function rq_record_events(jsonb);
create function rq_record_events(p_events jsonb)
returns table (ord bigint, event_id bigint, outcome text)
language plpgsql
as $$
declare
  r record;
  e generation_events;
  g generations;               -- the current state of v_request's row (null: no row)
  s rq_step;
  v_request text;
  v_changed boolean := false;
  v_keys text[];               -- dedupe keys this batch stores for v_request
  v_ids text[];
  v_rows generations[] := '{}';
  v_events generation_events[] := '{}';
begin
  -- One request at a time (pairs with generations_apply_waiting), locks in one order.
  v_ids := array(select distinct a.value ->> 'request_id'
                   from jsonb_array_elements(p_events) a
                  order by 1);
  perform pg_advisory_xact_lock(hashtextextended(i, 0)) from unnest(v_ids) i;
  perform 1 from generations t where t.request_id = any (v_ids) order by t.request_id for update;

  for r in
    select x.*, t as row, p as price
      from (select a.ordinality as ord, a.value ->> 'request_id' as request_id,
                   a.value ->> 'source' as source, a.value ->> 'kind' as kind,
                   nullif(a.value -> 'payload', 'null'::jsonb) as payload,
                   a.value ->> 'error' as error,
                   a.value ->> 'gateway_request_id' as gateway_request_id,
                   rq_event_dedupe_key(a.value ->> 'request_id', a.value ->> 'kind',
                                       nullif(a.value -> 'payload', 'null'::jsonb),
                                       a.value ->> 'error') as key
              from jsonb_array_elements(p_events) with ordinality a) x
      -- one index probe per event, whatever the table's size (offset 0: not flattened)
      left join lateral (select * from generations t where t.request_id = x.request_id
                         offset 0) t on true
      left join lateral rq_price_for(t.endpoint, t.inputs, t.created_at) p on true
     order by x.request_id, x.ord
  loop
    if r.request_id is distinct from v_request then
      if v_changed then
        v_rows := v_rows || g;
      end if;
      v_request := r.request_id;
      g := r.row;
      v_changed := false;
      v_keys := '{}';
    end if;
    ord := r.ord;
    if r.key = any (v_keys)
       or exists (select 1 from generation_events d where d.dedupe_key = r.key) then
      event_id := null;
      outcome := 'duplicate';
      return next;
      continue;
    end if;
    v_keys := v_keys || r.key;
    e := null;
    e.id := nextval(pg_get_serial_sequence('generation_events', 'id'));
    e.request_id := r.request_id;
    e.source := r.source;
    e.kind := r.kind;
    e.payload := r.payload;
    e.error := r.error;
    e.gateway_request_id := r.gateway_request_id;
    e.received_at := now();
    if g.id is null then
      outcome := 'waiting';
    else
      s := rq_next(e, g, r.price);
      outcome := s.outcome;
      if outcome in ('applied', 'conflict') then
        g := s.next;
        v_changed := true;
      end if;
      e.applied_at := e.received_at;
      e.outcome := outcome;
    end if;
    v_events := v_events || e;
    event_id := e.id;
    return next;
  end loop;
  if v_changed then
    v_rows := v_rows || g;
  end if;

  perform rq_store_rows(v_rows);
  insert into generation_events (id, request_id, source, kind, payload, error,
                                 gateway_request_id, received_at, applied_at, outcome)
  select n.id, n.request_id, n.source, n.kind, n.payload, n.error,
         n.gateway_request_id, n.received_at, n.applied_at, n.outcome
    from unnest(v_events) n;
end
$$;

-- One event: the batch writer with a one-element array (one code path for both).
create or replace function rq_record_event(p_request_id text, p_source text, p_kind text,
                                           p_payload jsonb, p_error text,
                                           p_gateway_request_id text)
returns table (event_id bigint, outcome text)
language sql
as $$
  select r.event_id, r.outcome
    from rq_record_events(jsonb_build_array(jsonb_build_object(
           'request_id', p_request_id, 'source', p_source, 'kind', p_kind,
           'payload', p_payload, 'error', p_error,
           'gateway_request_id', p_gateway_request_id))) r
$$;

-- Apply one stored event that was waiting for its row, at most once. Returns its outcome,
-- or 'waiting' while the row still does not exist.
create or replace function rq_apply_event(p_event_id bigint) returns text
language plpgsql
as $$
declare
  e generation_events;
  g generations;
  p prices;
  s rq_step;
begin
  select * into e from generation_events where id = p_event_id;
  if not found then
    raise exception 'rq_apply_event: no event with id %', p_event_id;
  end if;
  -- One request at a time: pairs with the lock in generations_apply_waiting and
  -- rq_record_events so an event and its row committed concurrently never miss each other.
  perform pg_advisory_xact_lock(hashtextextended(e.request_id, 0));
  select * into e from generation_events where id = p_event_id;
  if e.applied_at is not null then
    return e.outcome;
  end if;
  select * into g from generations where request_id = e.request_id for update;
  if not found then
    return 'waiting';
  end if;
  select * into p from rq_price_for(g.endpoint, g.inputs, g.created_at);
  s := rq_next(e, g, p);
  if s.outcome in ('applied', 'conflict') then
    perform rq_store_rows(array[s.next]);
  end if;
  update generation_events set applied_at = now(), outcome = s.outcome where id = e.id;
  return s.outcome;
end
$$;

drop function rq_apply(generation_events, generations);
