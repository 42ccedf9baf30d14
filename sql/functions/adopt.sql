-- Adopting what fal has: every request at fal is named by a generations row or by an orphan.
--
-- Every submit carries our identity in X-Fal-Tags (rq_item, rq_user, rq_batch; values
-- percent-encoded by the gateway, decoded before they reach SQL). The reconciler reads
-- fal's request list for the endpoints we use and hands each request to
-- rq_adopt_fal_request (below), the one place that decides what the ledger does with it:
--
--   known      the request id already has a generations row: nothing to do;
--   adopted    the tags name an item that is `pending` or `unknown` (a run died between
--              fal's answer and our write, or the answer was lost): the generations row is
--              written with fal's request id (its budget was admitted when the intent was
--              written), the item becomes `submitted`; stored webhook events apply on insert;
--   duplicate  the tags name an item that already has another request (fal-client retried
--              a submit whose answer was lost) or that we recorded as refused: the request
--              gets its own generations row, `duplicate_of` naming the item's request, at the
--              item's estimate, so a cent fal bills for it is attributable like any other
--              (same user, same batch item, same reports and billing reconciliation); the
--              reconciler cancels it when it is still queued;
--   orphan     no rq_item tag, or tags naming an item this ledger does not have (or whose
--              user, batch or endpoint differ: another deployment sharing the fal account):
--              recorded in fal_orphan_requests until someone explains it.

-- An adopted request belongs to the month it reached fal, like every other request: its
-- created_at is the item's send time (batch_items.sent_at), else fal's own time for the
-- request, else now.
-- The tables (fal_request_scans, fal_orphan_requests) are in sql/schema/80_adopt.sql.

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
