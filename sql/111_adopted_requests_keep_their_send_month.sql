-- An adopted request belongs to the month it reached fal, like every other request.
--
-- One month definition (ledger rule, docs/ledger.md "Money invariants"): a generation's
-- created_at is the moment its item was claimed for sending (`batch_items.sent_at`, set
-- by rq_claim_for_send), so the budget that admitted it and the spend it becomes fall in
-- the same UTC month. 110 dated an adopted row at the moment of adoption, which moved a
-- request sent at 23:59 on the 31st and adopted at 00:05 into the next month. Now: the
-- item's send time, else fal's own time for the request, else now.

create or replace function rq_adopt_fal_request(
  p_request_id text,
  p_endpoint text,
  p_tags jsonb,
  p_fal_status text default null,
  p_sent_at timestamptz default null,
  p_fal_expires_at timestamptz default null
)
returns table (outcome text, item_id bigint, first_request_id text, reason text)
language plpgsql
set search_path = public, pg_temp
as $$
declare
  v_item batch_items%rowtype;
  v_item_tag text := p_tags ->> 'rq_item';
  v_est record;
  v_reason text;
begin
  if p_request_id is null or p_request_id = '' then
    raise exception using errcode = 'invalid_parameter_value',
      message = 'rq_adopt_fal_request: request_id is empty';
  end if;
  -- one decision per request id at a time (two reconcilers, or a batch run recording it)
  perform pg_advisory_xact_lock(hashtextextended('renderqueue:fal-request:' || p_request_id, 0));

  if exists (select 1 from generations g where g.request_id = p_request_id) then
    return query select 'known'::text, null::bigint, null::text, null::text;
    return;
  end if;
  if exists (select 1 from fal_orphan_requests o where o.request_id = p_request_id) then
    return query select 'orphan'::text, null::bigint, null::text, null::text;
    return;
  end if;

  if v_item_tag is null then
    v_reason := 'no rq_item tag: not sent by renderqueue (or sent before tags existed)';
  elsif v_item_tag !~ '^[0-9]{1,18}$' then
    v_reason := format('rq_item tag %L is not an item id', left(v_item_tag, 80));
  else
    select * into v_item from batch_items i where i.id = v_item_tag::bigint for update;
    if not found then
      v_reason := format('rq_item %s names no batch item of this ledger', v_item_tag);
    elsif p_tags ? 'rq_user' and p_tags ->> 'rq_user' is distinct from v_item.user_id::text then
      v_reason := format('rq_item %s belongs to user %s, the tags say user %L',
                         v_item_tag, v_item.user_id, left(p_tags ->> 'rq_user', 80));
    elsif p_tags ? 'rq_batch'
          and p_tags ->> 'rq_batch' is distinct from v_item.batch_id::text then
      v_reason := format('rq_item %s is in batch %s, the tags say batch %L',
                         v_item_tag, coalesce(v_item.batch_id::text, 'none'),
                         left(p_tags ->> 'rq_batch', 80));
    elsif v_item.endpoint is distinct from p_endpoint then
      v_reason := format('rq_item %s is for %s, fal ran it on %s',
                         v_item_tag, v_item.endpoint, p_endpoint);
    end if;
  end if;

  if v_reason is not null then
    insert into fal_orphan_requests (request_id, endpoint, tags, reason, fal_status,
                                     fal_sent_at, first_seen_at)
    values (p_request_id, p_endpoint, coalesce(p_tags, '{}'), v_reason, p_fal_status,
            p_sent_at, rq_now())
    on conflict (request_id) do nothing;
    return query select 'orphan'::text, null::bigint, null::text, v_reason;
    return;
  end if;

  -- the price in force when the intent was written (its estimate is what was admitted)
  select e.price_id, e.seconds, e.cost_micros into v_est
  from rq_estimate(v_item.endpoint, v_item.inputs, v_item.created_at) e;

  insert into generations (request_id, user_id, endpoint, inputs, cost_micros, cost_basis,
                           price_id, billed_seconds, batch_item_id, fal_expires_at,
                           duplicate_of, created_at)
  values (p_request_id, v_item.user_id, v_item.endpoint, v_item.inputs,
          coalesce(v_item.estimate_micros, v_est.cost_micros, 0), 'estimate',
          v_est.price_id, v_est.seconds, v_item.id, p_fal_expires_at,
          case when v_item.state in ('pending', 'unknown') then null
               else coalesce(v_item.request_id, format('item %s (%s)', v_item.id, v_item.state))
          end,
          coalesce(v_item.sent_at, p_sent_at, rq_now()));

  if v_item.state in ('pending', 'unknown') then
    update batch_items
    set state = 'submitted', request_id = p_request_id,
        reason = 'adopted from fal''s request list (fal had the request; our record of '
                 || 'its answer was lost)',
        updated_at = rq_now()
    where id = v_item.id;
    return query select 'adopted'::text, v_item.id, p_request_id, null::text;
    return;
  end if;
  return query select 'duplicate'::text, v_item.id, v_item.request_id,
    format('item %s is %s%s; fal has a second request for it', v_item.id, v_item.state,
           coalesce(' as ' || v_item.request_id, ''));
end
$$;
