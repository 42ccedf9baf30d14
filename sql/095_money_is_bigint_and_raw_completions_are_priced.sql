-- Two corrections to the ledger's money rules (issue 18, findings 7 and 8).
--
-- 1. Cents are bigint. rq_micros_to_cents returned integer, and the reports apply it to
--    a month's summed micro-dollars: one group past $21,474,836.47 failed the refresh
--    with "integer out of range". Money is bigint everywhere, cents and micro-dollars.
--    (generations.cost_cents stays the seed article's integer column: one row's cents;
--    the guard writes it from the bigint.)
-- 2. A completion that carries no cost is priced by the guard, whoever writes it. The
--    seed article's own webhook statement (UPDATE generations SET status = 'completed',
--    outputs = ..., finished_at = now()) on a row that had no estimate left the row at
--    cost 0, basis 'none': never priced, and the report's price check failed. The guard
--    now prices it as the state machine prices a completion (rq_next): the price in force
--    at the row's creation, the output's documented duration ('computed') or the
--    requested / default seconds ('requested'); no price row: 'unpriced'. A completion
--    that already carries a cost (an estimate, our figure, fal's bill) keeps it, as the
--    article's answers expect.
--
-- The guard's updated_at now reads the ledger's clock (rq_now(), 085_injectable_clock.sql).

drop function rq_micros_to_cents(bigint);
create function rq_micros_to_cents(micros bigint) returns bigint
language sql immutable parallel safe
as $$ select round(micros / 10000.0)::bigint $$;

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
