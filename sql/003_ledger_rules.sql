-- The ledger rules (DESIGN.md, rules 2-6) live here, in the database, so that they hold
-- for every writer: our submit path, the webhook receiver, the reconciler, and even the
-- seed article's own raw INSERT and UPDATE statements.
--
--   rq_apply(event, row)       the one state machine; every event goes through it
--   generations_apply_waiting  applies stored events when their row appears (rule 4)
--   generations_guard          invariants: forward-only status, exact money, no charge
--                              for failed/canceled rows (rules 3 and 6)

-- Micro-dollars to cents, rounded half up, per row. Reports sum micro-dollars and round
-- once, so per-row rounding never accumulates.
create function rq_micros_to_cents(micros bigint) returns integer
language sql immutable parallel safe
as $$ select round(micros / 10000.0)::integer $$;

-- Seconds the request asks for: 5, "5" or "5s"; null for "auto", missing or unreadable
-- (the submit path rejects unreadable values before they get here).
create function rq_requested_seconds(inputs jsonb) returns numeric
language sql immutable parallel safe
as $$
  select case
    when jsonb_typeof(inputs -> 'duration') = 'number' then (inputs ->> 'duration')::numeric
    when jsonb_typeof(inputs -> 'duration') = 'string'
         and lower(btrim(inputs ->> 'duration')) ~ '^[0-9]+(\.[0-9]+)?s?$'
      then rtrim(lower(btrim(inputs ->> 'duration')), 's')::numeric
  end
$$;

-- Seconds the output actually lasts, when the provider says so.
create function rq_output_seconds(payload jsonb) returns numeric
language sql immutable parallel safe
as $$
  select case
    when jsonb_typeof(payload -> 'video' -> 'duration') = 'number'
      then (payload -> 'video' ->> 'duration')::numeric
    when jsonb_typeof(payload -> 'duration') = 'number'
      then (payload ->> 'duration')::numeric
  end
$$;

-- The price row in force for a request at a moment: the newest row of the endpoint whose
-- resolution and audio match (a null column matches anything).
create function rq_price_for(p_endpoint text, p_inputs jsonb, p_at timestamptz)
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
         or p.with_audio = coalesce((p_inputs ->> 'generate_audio')::boolean, true))
  order by p.effective_from desc, p.resolution is null, p.with_audio is null
  limit 1
$$;

-- cost = base_micros + round(max(seconds - base_seconds, 0) * micros_per_second)
create function rq_cost_micros(p_price prices, p_seconds numeric) returns bigint
language sql immutable parallel safe
as $$
  select p_price.base_micros
         + round(greatest(p_seconds - p_price.base_seconds, 0) * p_price.micros_per_second)::bigint
$$;

-- The estimate at submit: requested seconds (or the endpoint's default for "auto").
create function rq_estimate(p_endpoint text, p_inputs jsonb, p_at timestamptz default now())
returns table (price_id bigint, seconds numeric, cost_micros bigint, price_version text)
language sql stable
as $$
  select p.id,
         coalesce(rq_requested_seconds(p_inputs), p.default_seconds),
         rq_cost_micros(p, coalesce(rq_requested_seconds(p_inputs), p.default_seconds)),
         p.price_version
  from rq_price_for(p_endpoint, p_inputs, p_at) p
$$;

-- The outputs column in the seed article's shape for a video payload; other payloads as is.
create function rq_outputs_from_payload(payload jsonb) returns jsonb
language sql immutable parallel safe
as $$
  select case
    when payload -> 'video' ->> 'url' is not null then jsonb_strip_nulls(jsonb_build_object(
      'video_url', payload -> 'video' ->> 'url',
      'original_url', payload -> 'video' ->> 'url',
      'duration', payload -> 'video' -> 'duration',
      'seed', payload -> 'seed',
      'content_type', payload -> 'video' -> 'content_type',
      'file_name', payload -> 'video' -> 'file_name',
      'file_size', payload -> 'video' -> 'file_size'))
    else payload
  end
$$;

-- THE state machine: what event `e` does to generation `g` (locked by the caller). It
-- writes the row and returns the outcome: applied | duplicate | stale | conflict.
--   status only moves forward: submitted -> in_progress -> completed | failed | canceled,
--   submitted may jump to a terminal state, a terminal state never changes; a different
--   terminal event for a finished row is kept, marked 'conflict', and flags the row.
-- Callers: rq_record_event (a new event) and rq_apply_event (a stored, waiting one).
create function rq_apply(e generation_events, g generations) returns text
language plpgsql
as $$
declare
  p prices;
  v_seconds numeric;
  v_outputs jsonb;
begin
  -- A completed row whose webhook carried no payload (fal's payload_error) is still
  -- waiting for its output: a later completed event with the payload fills it in.
  if g.status in ('completed', 'failed', 'canceled')
     and not (g.status = 'completed' and e.kind = 'completed'
              and g.outputs is null and e.payload is not null) then
    if e.kind = g.status::text then
      return 'duplicate';
    elsif e.kind = 'in_progress' then
      return 'stale';
    end if;
    update generations set conflict = true where id = g.id;
    return 'conflict';
  end if;

  if e.kind = 'in_progress' then
    if g.status <> 'submitted' then
      return 'duplicate';
    end if;
    update generations set status = 'in_progress' where id = g.id;
  elsif e.kind = 'completed' and e.payload is null then
    -- Finished, but fal could not serialise the output: the estimate stands until the
    -- reconciler fetches the result (fal keeps it about an hour).
    update generations
       set status = 'completed', finished_at = e.received_at,
           error = coalesce(e.error, 'completed without a payload')
     where id = g.id;
  elsif e.kind = 'completed' then
    v_outputs := rq_outputs_from_payload(e.payload);
    select * into p from rq_price_for(g.endpoint, g.inputs, g.created_at);
    v_seconds := coalesce(rq_output_seconds(e.payload), rq_requested_seconds(g.inputs),
                          p.default_seconds);
    update generations
       set status = 'completed', outputs = v_outputs, error = null,
           finished_at = coalesce(g.finished_at, e.received_at),
           cost_basis = case when p.id is null then 'unpriced' else 'actual' end,
           price_id = coalesce(p.id, price_id),
           billed_seconds = v_seconds,
           cost_micros = case when p.id is null then cost_micros
                              else rq_cost_micros(p, v_seconds) end,
           archive_status = case when v_outputs ? 'video_url' then 'pending' else 'none' end
     where id = g.id;
  else  -- failed or canceled: never charged (generations_guard zeroes the cost)
    update generations
       set status = e.kind::generation_status,
           finished_at = e.received_at,
           error = left(coalesce(e.error, e.kind)
                        || coalesce(': ' || (e.payload ->> 'detail'), ': ' || e.payload::text, ''),
                        4000)
     where id = g.id;
  end if;
  return 'applied';
end
$$;

-- Apply one stored event that was waiting for its row, at most once. Returns its outcome,
-- or 'waiting' while the row still does not exist.
create function rq_apply_event(p_event_id bigint) returns text
language plpgsql
as $$
declare
  e generation_events;
  g generations;
  v_outcome text;
begin
  select * into e from generation_events where id = p_event_id;
  if not found then
    raise exception 'rq_apply_event: no event with id %', p_event_id;
  end if;
  -- One request at a time: pairs with the lock in generations_apply_waiting and
  -- rq_record_event so an event and its row committed concurrently never miss each other.
  perform pg_advisory_xact_lock(hashtextextended(e.request_id, 0));
  select * into e from generation_events where id = p_event_id;
  if e.applied_at is not null then
    return e.outcome;
  end if;
  select * into g from generations where request_id = e.request_id for update;
  if not found then
    return 'waiting';
  end if;
  v_outcome := rq_apply(e, g);
  update generation_events set applied_at = now(), outcome = v_outcome where id = e.id;
  return v_outcome;
end
$$;

-- Rule 4: events that arrived before their row are applied in the transaction that
-- inserts the row, whoever inserts it (our submit path or the article's raw INSERT).
create function rq_generations_apply_waiting() returns trigger
language plpgsql
as $$
declare
  r record;
begin
  perform pg_advisory_xact_lock(hashtextextended(new.request_id, 0));
  for r in
    select id from generation_events
    where request_id = new.request_id and applied_at is null
    order by id
  loop
    perform rq_apply_event(r.id);
  end loop;
  return null;
end
$$;

create trigger generations_apply_waiting
  after insert on generations
  for each row execute function rq_generations_apply_waiting();

-- Invariants every write must keep, including the article's raw statements:
-- cost_cents always equals cost_micros rounded half up to cents; a raw write of
-- cost_cents alone sets cost_micros to match; status never moves backwards; a terminal
-- status never changes; failed and canceled rows cost nothing.
create function rq_generations_guard() returns trigger
language plpgsql
as $$
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
    new.updated_at := now();
  end if;
  if new.status in ('failed', 'canceled') then
    new.cost_micros := 0;
    new.cost_basis := 'none';
  end if;
  new.cost_cents := rq_micros_to_cents(new.cost_micros);
  return new;
end
$$;

create trigger generations_guard
  before insert or update on generations
  for each row execute function rq_generations_guard();

-- Store one new event and apply it, in one round trip. A duplicate (same dedupe_key) is
-- not stored again and reports 'duplicate'. Otherwise the event is decided first and then
-- stored once, already marked applied ('waiting' events are stored unapplied).
create function rq_record_event(p_request_id text, p_source text, p_kind text,
                                p_payload jsonb, p_error text, p_gateway_request_id text)
returns table (event_id bigint, outcome text)
language plpgsql
as $$
declare
  e generation_events;
  g generations;
begin
  perform pg_advisory_xact_lock(hashtextextended(p_request_id, 0));
  -- under the request's lock, an earlier copy is either committed or ours
  if exists (select 1 from generation_events
             where dedupe_key = rq_event_dedupe_key(p_request_id, p_kind, p_payload, p_error))
  then
    event_id := null;
    outcome := 'duplicate';
    return next;
    return;
  end if;
  e.request_id := p_request_id;
  e.source := p_source;
  e.kind := p_kind;
  e.payload := p_payload;
  e.error := p_error;
  e.received_at := now();
  select * into g from generations where request_id = p_request_id for update;
  outcome := case when found then rq_apply(e, g) else 'waiting' end;
  insert into generation_events (request_id, source, kind, payload, error, gateway_request_id,
                                 received_at, applied_at, outcome)
  values (p_request_id, p_source, p_kind, p_payload, p_error, p_gateway_request_id,
          e.received_at,
          case when outcome = 'waiting' then null else e.received_at end,
          nullif(outcome, 'waiting'))
  returning id into event_id;
  return next;
end
$$;
