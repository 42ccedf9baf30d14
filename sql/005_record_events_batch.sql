-- Many events in one statement, for the webhook receiver's group commit: the same
-- rq_record_event per element, in array order, in the caller's (one) transaction, so the
-- outcome of each is exactly what one call per event would give, without one client round
-- trip, parse and executor start per event.
--
-- p_events is a JSON array of {request_id, source, kind, payload, error,
-- gateway_request_id}; a JSON null payload is stored as SQL null, like a missing one.
-- The caller orders the array by request_id (per-request locks taken in one order).
create function rq_record_events(p_events jsonb)
returns table (ord bigint, event_id bigint, outcome text)
language plpgsql
as $$
declare
  e jsonb;
begin
  for e, ord in
    select value, ordinality from jsonb_array_elements(p_events) with ordinality
    order by ordinality
  loop
    select r.event_id, r.outcome into event_id, outcome
    from rq_record_event(e ->> 'request_id', e ->> 'source', e ->> 'kind',
                         nullif(e -> 'payload', 'null'::jsonb), e ->> 'error',
                         e ->> 'gateway_request_id') r;
    return next;
  end loop;
end
$$;
