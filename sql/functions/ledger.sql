-- The ledger rules (DESIGN.md, rules 2-6) live here, in the database, so that they hold
-- for every writer: our submit path, the webhook receiver, the reconciler, and even the
-- seed article's own raw INSERT and UPDATE statements. Each function is defined once, in
-- this file; `renderqueue db migrate` applies the file again whenever its text changes.
-- Read top to bottom:
--
--   money       rq_micros_to_cents, rq_parse_duration, rq_requested_seconds,
--               rq_output_seconds, rq_price_for, rq_cost_micros, rq_estimate
--   rq_next     THE state machine: what one event does to one generation. Pure: it
--               returns the outcome and the row's next state, reads and writes nothing.
--   writers     rq_lock_requests (one lock order for everyone), rq_store_rows,
--               rq_record_events (new events, set-based: the webhook's group commit),
--               rq_record_event (one new event), rq_apply_requests / rq_apply_events /
--               rq_apply_event (stored events that waited for their row),
--               rq_expire_waiting_events
--   triggers    generations_apply_waiting (rule 4: a new row picks up its waiting
--               events), generations_guard (rules 3 and 6 for any writer, raw SQL too),
--               generations_keep_finished_at (a retried webhook is a no-op)
--   measured    rq_apply_measured_seconds (a clip priced from its archived file's length)

-- == Money ============================================================================

-- Micro-dollars to cents, rounded half up. Reports sum micro-dollars and round once, so
-- per-row rounding never accumulates; bigint, so a report group of any size fits.
create or replace function rq_micros_to_cents(micros bigint) returns bigint
language sql immutable parallel safe
as $$ select round(micros / 10000.0)::bigint $$;

-- THE definition of a requested duration (the Python validation asks this function too):
--   missing, JSON null or "auto"     -> seconds null (the endpoint's default applies)
--   a JSON number                    -> that many seconds
--   a string of digits, optionally with a fraction, a sign and a trailing "s", any case,
--   surrounded by spaces: "5", " 5.5S ", "-5"  -> that many seconds
--   anything else ("five", ".5", "1e2", true) -> a problem: expected seconds or 'auto'
-- and the seconds must be positive and at most an hour.
create or replace function rq_parse_duration(p_value jsonb, out seconds numeric, out problem text)
language plpgsql immutable parallel safe
as $$
declare
  v_text text;
begin
  if p_value is null or jsonb_typeof(p_value) = 'null' then
    return;
  elsif jsonb_typeof(p_value) = 'number' then
    seconds := p_value::text::numeric;
  elsif jsonb_typeof(p_value) = 'string' then
    v_text := lower(btrim(p_value #>> '{}', ' '));
    if v_text = 'auto' then
      return;
    elsif v_text !~ '^[+-]?[0-9]+(\.[0-9]+)?s?$' then
      problem := format('expected seconds or ''auto'', got %s', p_value::text);
      return;
    end if;
    seconds := rtrim(v_text, 's')::numeric;
  else
    problem := format('expected seconds or ''auto'', got %s', p_value::text);
    return;
  end if;
  if seconds <= 0 then
    problem := format('must be positive, got %s', p_value::text);
    seconds := null;
  elsif seconds > 3600 then
    problem := format('must be at most 3600 s, got %s', p_value::text);
    seconds := null;
  end if;
end
$$;

-- Seconds the request asks for; null for "auto", missing or unreadable (the submit path
-- rejects unreadable values; the article's raw INSERT may still hold one).
create or replace function rq_requested_seconds(inputs jsonb) returns numeric
language sql immutable parallel safe
as $$ select (rq_parse_duration(inputs -> 'duration')).seconds $$;

-- Seconds the output lasts, only where the endpoint's documented output states it (the
-- price row's output_seconds_path); null otherwise. No other output field is read for money.
create or replace function rq_output_seconds(payload jsonb, p prices) returns numeric
language sql immutable parallel safe
as $$
  select case
    when p.output_seconds_path is not null
         and jsonb_typeof(payload #> p.output_seconds_path) = 'number'
      then (payload #>> p.output_seconds_path)::numeric
  end
$$;

-- The price row in force for a request at a moment: the newest row of the endpoint whose
-- resolution and audio match (a null column matches anything). It never raises on a row's
-- data (an error here would sink every event of the row): a `generate_audio` that is not
-- a JSON boolean, which only a hand-written row can hold, counts as the default (audio on).
create or replace function rq_price_for(p_endpoint text, p_inputs jsonb, p_at timestamptz)
returns setof prices
language sql stable
as $$
  select p.*
  from prices p
  where p.endpoint = p_endpoint
    and p.effective_from <= p_at
    and (p.resolution is null
         or p.resolution = coalesce(p_inputs ->> 'resolution', p.default_resolution))
    and (p.with_audio is null
         or p.with_audio = case when jsonb_typeof(p_inputs -> 'generate_audio') = 'boolean'
                                then (p_inputs ->> 'generate_audio')::boolean
                                else true end)
  order by p.effective_from desc, p.resolution is null, p.with_audio is null
  limit 1
$$;

-- cost = base_micros + round(max(seconds - base_seconds, 0) * micros_per_second),
-- rounded half away from zero to the micro-dollar (x.5 micro-dollars -> x+1).
create or replace function rq_cost_micros(p_price prices, p_seconds numeric) returns bigint
language sql immutable parallel safe
as $$
  select p_price.base_micros
         + round(greatest(p_seconds - p_price.base_seconds, 0) * p_price.micros_per_second)::bigint
$$;

-- The estimate at submit: requested seconds (or the endpoint's default for "auto").
create or replace function rq_estimate(p_endpoint text, p_inputs jsonb, p_at timestamptz default now())
returns table (price_id bigint, seconds numeric, cost_micros bigint, price_version text)
language sql stable
as $$
  select p.id,
         coalesce(rq_requested_seconds(p_inputs), p.default_seconds),
         rq_cost_micros(p, coalesce(rq_requested_seconds(p_inputs), p.default_seconds)),
         p.price_version
  from rq_price_for(p_endpoint, p_inputs, p_at) p
$$;

-- == The state machine ================================================================

-- What event `e` does to generation `g`, whose price in force is `p` (rq_price_for; null
-- when there is none). Outcomes: applied | duplicate | stale | conflict.
--
--   Status only moves forward: submitted -> in_progress -> completed | failed | canceled;
--   submitted may jump to a terminal state; a terminal state never changes, with two
--   exceptions, both toward what fal bills:
--     * a completed row whose webhook carried no payload (fal's payload_error) still
--       waits for its output: a later completed event with the payload fills it in;
--     * a canceled row that fal reports completed becomes completed and is billed
--       (cancelling a running request only signals the app: it may finish, and fal
--       bills it). A cancel arriving after the completion is 'stale'.
--   Any other different terminal event for a finished row is kept, marked 'conflict',
--   and flags the row.
--   fal has no cancel event: an ERROR outcome (a 'failed' event) on a row whose cancel
--   fal accepted (cancel_requested_at) is the cancellation.
--   Cost: a completion is priced from the output's duration where the endpoint documents
--   one ('computed'), else from the requested or default seconds ('requested'); failed
--   and canceled rows cost nothing. A late payload for a generation whose cost fal has
--   already billed keeps fal's figure (cost_basis 'billed'); the computed figure goes
--   beside it, into computed_cost_micros / computed_cost_basis.
--   Outputs: `outputs` holds fal's payload exactly as fal sent it.
create or replace function rq_next(e generation_events, g generations, p prices)
returns rq_step
language plpgsql immutable parallel safe
as $$
declare
  n generations := g;
  v_kind text := e.kind;
  v_output_seconds numeric;
  v_seconds numeric;
  v_cost bigint;
  v_basis text;
begin
  if v_kind = 'failed' and g.cancel_requested_at is not null then
    v_kind := 'canceled';
  end if;

  if g.status in ('completed', 'failed', 'canceled')
     and not (g.status = 'completed' and v_kind = 'completed'
              and g.outputs is null and e.payload is not null)
     and not (g.status = 'canceled' and v_kind = 'completed') then
    if v_kind = g.status::text then
      return row('duplicate', g)::rq_step;
    elsif v_kind = 'in_progress' or (g.status = 'completed' and v_kind = 'canceled') then
      return row('stale', g)::rq_step;
    end if;
    n.conflict := true;
    return row('conflict', n)::rq_step;
  end if;

  if v_kind = 'in_progress' then
    if g.status <> 'submitted' then
      return row('duplicate', g)::rq_step;
    end if;
    n.status := 'in_progress';
  elsif v_kind = 'completed' and e.payload is null then
    -- Finished, but fal could not serialise the output: the estimate stands until the
    -- reconciler fetches the result (fal keeps it about an hour).
    n.status := 'completed';
    n.finished_at := e.received_at;
    n.error := coalesce(e.error, 'completed without a payload');
    if g.status = 'canceled' and p.id is not null then  -- its estimate was zeroed
      v_seconds := coalesce(rq_requested_seconds(g.inputs), p.default_seconds);
      n.cost_micros := rq_cost_micros(p, v_seconds);
      n.cost_basis := 'estimate';
      n.price_id := p.id;
      n.billed_seconds := v_seconds;
    end if;
  elsif v_kind = 'completed' then
    v_output_seconds := rq_output_seconds(e.payload, p);
    v_seconds := coalesce(v_output_seconds, rq_requested_seconds(g.inputs), p.default_seconds);
    v_cost := case when p.id is null then g.cost_micros else rq_cost_micros(p, v_seconds) end;
    v_basis := case when p.id is null then 'unpriced'
                    when v_output_seconds is not null then 'computed'
                    else 'requested' end;
    n.status := 'completed';
    n.outputs := e.payload;
    n.error := null;
    n.finished_at := case when g.status = 'completed' then coalesce(g.finished_at, e.received_at)
                          else e.received_at end;
    n.price_id := coalesce(p.id, g.price_id);
    n.billed_seconds := case when p.id is null then g.billed_seconds else v_seconds end;
    if g.cost_basis = 'billed' then  -- fal's bill stands; ours goes beside it
      n.computed_cost_micros := case when p.id is null then g.computed_cost_micros
                                     else v_cost end;
      n.computed_cost_basis := v_basis;
    else
      n.cost_micros := v_cost;
      n.cost_basis := v_basis;
    end if;
    n.archive_status := case when exists (select 1 from rq_output_files(e.payload))
                             then 'pending' else 'none' end;
  else  -- failed or canceled: never charged
    n.status := v_kind::generation_status;
    n.finished_at := e.received_at;
    n.error := left(coalesce(e.error, v_kind)
                    || coalesce(': ' || (e.payload ->> 'detail'), ': ' || e.payload::text, ''),
                    4000);
    n.cost_micros := 0;
    n.cost_basis := 'none';
  end if;
  return row('applied', n)::rq_step;
end
$$;

-- == Writers ==========================================================================

-- One lock order for every writer, so concurrent writers never deadlock: a transaction-
-- scoped advisory lock per request id, taken in the order of `p_request_ids` (callers
-- pass them sorted and distinct), after a shared hold of one ledger-wide lock. A set too
-- large for the lock table (more than 256 requests: a bulk INSERT) takes the ledger-wide
-- lock exclusively instead: one lock, and no other writer runs until it commits.
-- A per-request lock makes an event and its row committed at the same moment see each
-- other (rule 4); the row lock alone cannot, as the event may come before the row.
create or replace function rq_lock_requests(p_request_ids text[]) returns void
language plpgsql
as $$
begin
  if cardinality(p_request_ids) > 256 then
    perform pg_advisory_xact_lock(29297, 1);  -- ("rq", 1): the ledger-wide lock
  else
    perform pg_advisory_xact_lock_shared(29297, 1);
    perform pg_advisory_xact_lock(hashtextextended(i, 0)) from unnest(p_request_ids) i;
  end if;
end
$$;

-- Write the next states rq_next computed (rows locked by the caller). Only the columns the
-- state machine owns; generations_guard still checks every row.
create or replace function rq_store_rows(p_rows generations[]) returns void
language plpgsql
as $$
begin
  update generations t
     set status = n.status, outputs = n.outputs, error = n.error,
         finished_at = n.finished_at, cost_micros = n.cost_micros,
         cost_basis = n.cost_basis, price_id = n.price_id,
         billed_seconds = n.billed_seconds, conflict = n.conflict,
         archive_status = n.archive_status,
         computed_cost_micros = n.computed_cost_micros,
         computed_cost_basis = n.computed_cost_basis
    from unnest(p_rows) n
   where t.id = n.id;
end
$$;

-- Store and apply new events: the one writer of every source (webhook group commit,
-- reconciler, API), with a fixed number of statements however many events.
-- p_events is a JSON array of {request_id, source, kind, payload, error,
-- gateway_request_id} in arrival order; a JSON null payload is stored as SQL null, like a
-- missing one. Each event gets the outcome one call per event in array order would give:
-- duplicates (same dedupe_key as a stored event or an earlier one in the array) are not
-- stored again; the others are stored once, already applied, or unapplied ('waiting')
-- while their row does not exist.
create or replace function rq_record_events(p_events jsonb)
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
  v_rows generations[] := '{}';
  v_events generation_events[] := '{}';
begin
  perform rq_lock_requests(array(select distinct a.value ->> 'request_id'
                                   from jsonb_array_elements(p_events) a
                                  order by 1));
  perform 1 from generations t
   where t.request_id = any (array(select a.value ->> 'request_id'
                                     from jsonb_array_elements(p_events) a))
   order by t.request_id for update;

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

-- One new event: rq_record_events with a one-element array (one code path for both).
create or replace function rq_record_event(p_request_id text, p_source text, p_kind text,
                                p_payload jsonb, p_error text, p_gateway_request_id text)
returns table (event_id bigint, outcome text)
language sql
as $$
  select r.event_id, r.outcome
    from rq_record_events(jsonb_build_array(jsonb_build_object(
           'request_id', p_request_id, 'source', p_source, 'kind', p_kind,
           'payload', p_payload, 'error', p_error,
           'gateway_request_id', p_gateway_request_id))) r
$$;

-- The fold of rq_next over stored, still-waiting events of some requests (locked by the
-- caller), in arrival order: rows and events written, one row per event returned with its
-- outcome ('waiting' while the request has no row).
create or replace function rq_apply_requests(p_request_ids text[])
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

-- Apply stored events that waited for their row, each at most once, in the same lock
-- order as rq_record_events. Returns one row per event: its outcome, 'waiting' while the
-- row still does not exist, or 'error' when applying it failed: the reason is recorded on
-- the event (apply_error) and the other requests' events go on. Requests are tried in
-- groups of 100, one subtransaction each; a group that fails is retried one request per
-- subtransaction to find the culprit (so a large set stays well inside the lock table).
-- Failures of the transaction itself (deadlock, serialization, lock or statement timeout,
-- out of resources, shutdown) are raised, not recorded.
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

-- Mark events that waited longer than `p_retention` for a row that never came (another
-- fal account's webhook, a submit whose outcome is unknown). They are kept, counted and
-- listed; should the row appear after all, they are still applied.
create or replace function rq_expire_waiting_events(p_retention interval) returns bigint
language sql
as $$
  with expired as (
    update generation_events e
       set expired_at = now()
     where e.applied_at is null and e.expired_at is null
       and e.received_at < now() - p_retention
       and not exists (select 1 from generations g where g.request_id = e.request_id)
    returning 1)
  select count(*) from expired
$$;

-- == Triggers =========================================================================

-- Rule 4: events that arrived before their row are applied in the statement that inserts
-- the row, whoever inserts it (our submit path or the article's raw INSERT), for any
-- number of rows: the requests are locked in rq_lock_requests' order, after which every
-- event committed before is visible and every later one sees the row. An event that
-- cannot be applied is marked (apply_error); it never fails the INSERT.
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

create or replace trigger generations_apply_waiting
  after insert on generations
  referencing new table as new_rows
  for each statement execute function rq_generations_apply_waiting();

-- Invariants every write must keep, including the article's raw statements:
-- cost_cents always equals cost_micros rounded half up to cents; a raw write of
-- cost_cents alone sets cost_micros to match; status never moves backwards; a terminal
-- status never changes except canceled -> completed (fal finished and billed a request
-- we asked to cancel); failed and canceled rows cost nothing. A completion that carries
-- no cost (the seed article's own webhook statement on a row with no estimate) is priced
-- as rq_next prices one: the price in force at the row's creation, the output's documented
-- duration ('computed') or the requested / default seconds ('requested'); no price row:
-- 'unpriced'. A completion that already carries a cost keeps it.
create or replace function rq_generations_guard() returns trigger
language plpgsql
as $$
declare
  p prices;
  v_output_seconds numeric;
  v_seconds numeric;
begin
  if tg_op = 'INSERT' then
    if new.cost_micros = 0 and new.cost_cents <> 0 then
      new.cost_micros := new.cost_cents::bigint * 10000;
    end if;
    if new.cost_basis = 'none' and new.cost_micros > 0 then
      new.cost_basis := 'estimate';
    end if;
  else
    if new.status is distinct from old.status
       and not (old.status = 'canceled' and new.status = 'completed')
       and (old.status in ('completed', 'failed', 'canceled')
            or (old.status = 'in_progress' and new.status = 'submitted')) then
      raise exception using
        errcode = 'check_violation',
        message = format('generation %s is %s and cannot become %s',
                         old.request_id, old.status, new.status),
        hint = 'status only moves forward and a terminal status never changes';
    end if;
    if new.cost_micros is not distinct from old.cost_micros
       and new.cost_cents is distinct from old.cost_cents then
      new.cost_micros := new.cost_cents::bigint * 10000;
    end if;
    -- a completion with no cost behind it (a raw UPDATE of a row that had no estimate):
    -- priced here, as rq_next prices one
    if new.status = 'completed' and old.status is distinct from 'completed'
       and new.cost_basis = 'none' and new.cost_micros = 0 then
      select * into p from rq_price_for(new.endpoint, new.inputs, new.created_at);
      if p.id is null then
        new.cost_basis := 'unpriced';
      else
        v_output_seconds := rq_output_seconds(new.outputs, p);
        v_seconds := coalesce(v_output_seconds, rq_requested_seconds(new.inputs),
                              p.default_seconds);
        new.cost_micros := rq_cost_micros(p, v_seconds);
        new.cost_basis := case when v_output_seconds is not null then 'computed'
                               else 'requested' end;
        new.price_id := p.id;
        new.billed_seconds := v_seconds;
      end if;
    end if;
    new.updated_at := rq_now();
  end if;
  if new.status in ('failed', 'canceled') then
    new.cost_micros := 0;
    new.cost_basis := 'none';
  end if;
  new.cost_cents := rq_micros_to_cents(new.cost_micros);
  return new;
end
$$;

create or replace trigger generations_guard
  before insert or update on generations
  for each row execute function rq_generations_guard();

-- The seed article's webhook statement sets `finished_at = now()` every time it runs, so a
-- retried delivery moved the finish time of a row that had already finished. An UPDATE
-- that sets the status of a finished row to the status it already has (a retried
-- webhook) keeps the row's finished_at: the retry is a no-op. An UPDATE that does not
-- name the status (a correction of finished_at alone) is left as it is.
create or replace function rq_generations_keep_finished_at() returns trigger
language plpgsql
as $$
begin
  new.finished_at := old.finished_at;
  return new;
end
$$;

create or replace trigger generations_keep_finished_at
  before update of status on generations
  for each row
  when (old.status = new.status
        and old.status in ('completed', 'failed', 'canceled')
        and old.finished_at is not null)
  execute function rq_generations_keep_finished_at();

-- == Measured length ==================================================================

-- Apply the length measured from generation `p_id`'s archived file (null seconds: it could
-- not be read, `p_problem` says why). Returns what it did: 'measured' (cost re-priced),
-- 'billed' (fal's bill kept, our figure beside it re-priced), 'kept' (the basis is better
-- than a measurement, or the row is not a completed, priced one), 'unreadable', or null
-- when no such generation exists.
create or replace function rq_apply_measured_seconds(p_id bigint, p_seconds numeric, p_problem text)
returns text
language plpgsql
as $$
declare
  g generations;
  p prices;
  v_cost bigint;
begin
  select * into g from generations where id = p_id for update;
  if not found then
    return null;
  end if;
  if p_seconds is null or p_seconds <= 0 then
    update generations
       set measured_seconds_problem = left(coalesce(p_problem, 'no duration in the file'), 500)
     where id = p_id;
    return 'unreadable';
  end if;
  update generations set measured_seconds = p_seconds, measured_seconds_problem = null
   where id = p_id;
  if g.status <> 'completed' then
    return 'kept';
  end if;
  select * into p from rq_price_for(g.endpoint, g.inputs, g.created_at);
  if p.id is null then
    return 'kept';
  end if;
  v_cost := rq_cost_micros(p, p_seconds);
  if g.cost_basis in ('requested', 'estimate', 'measured') then
    update generations
       set cost_micros = v_cost, cost_basis = 'measured', billed_seconds = p_seconds,
           price_id = p.id
     where id = p_id;
    return 'measured';
  elsif g.cost_basis = 'billed'
        and coalesce(g.computed_cost_basis, 'requested') in ('requested', 'estimate', 'measured')
  then
    update generations
       set computed_cost_micros = v_cost, computed_cost_basis = 'measured'
     where id = p_id;
    return 'billed';
  end if;
  return 'kept';
end
$$;
