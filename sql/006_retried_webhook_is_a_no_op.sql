-- The seed article's webhook statement sets `finished_at = now()` every time it runs, so a
-- retried delivery moved the finish time of a row that had already finished. A row that
-- stays in the same terminal status keeps its finished_at: the retry is a no-op.
-- Otherwise generations_guard is as in 003_state_machine.sql.
create or replace function rq_generations_guard() returns trigger
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
       and not (old.status = 'canceled' and new.status = 'completed')
       and (old.status in ('completed', 'failed', 'canceled')
            or (old.status = 'in_progress' and new.status = 'submitted')) then
      raise exception using
        errcode = 'check_violation',
        message = format('generation %s is %s and cannot become %s',
                         old.request_id, old.status, new.status),
        hint = 'status only moves forward and a terminal status never changes';
    end if;
    if new.status = old.status and old.status in ('completed', 'failed', 'canceled')
       and old.finished_at is not null then
      new.finished_at := old.finished_at;
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
