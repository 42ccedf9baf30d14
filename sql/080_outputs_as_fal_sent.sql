-- Two corrections to the state machine (rq_next), both about keeping what fal said:
--
-- 1. Provenance: `outputs` holds fal's payload exactly as fal sent it. Until now the
--    ledger rewrote a video payload into the seed article's flat shape (`video_url`,
--    `original_url`, ...); the raw payload survived only in generation_events. Our copy
--    lives in archive_url / generation_files, and `generation_media` gives each file's best
--    link, so nothing needs the flat shape (rq_output_files reads either shape, and rows
--    written by the article's own statements keep theirs). Rows the ledger rewrote get
--    fal's payload back from their applied completed event.
-- 2. A late payload (fal's result fetched after the completion webhook carried none) for a
--    generation whose cost fal has already billed keeps fal's figure (cost_basis
--    'billed'); the newly computed figure goes beside it, into computed_cost_micros /
--    computed_cost_basis, as spend_apply_billed does.

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

-- The columns the state machine owns, now with our own figure beside fal's bill.
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

-- Rows the ledger rewrote get fal's payload back, from the completed event that set it
-- (the last applied one with a payload). A row whose outputs differ from the rewrite of
-- that payload (written by other means, e.g. the seed article's own UPDATE) is left alone.
update generations g
   set outputs = e.payload
  from (select distinct on (request_id) request_id, payload
          from generation_events
         where kind = 'completed' and payload is not null and outcome = 'applied'
         order by request_id, id desc) e
 where g.request_id = e.request_id
   and g.outputs is not null
   and g.outputs ? 'video_url'
   and g.outputs = rq_outputs_from_payload(e.payload);

drop function rq_outputs_from_payload(jsonb);
