-- Clips priced from their measured length (issue 21, part 4).
--
-- fal's documented Seedance output has no duration, so a completed "auto" clip is priced
-- from the endpoint's default seconds (cost_basis 'requested') until fal bills it. Once
-- the archive has copied the file it reads the length the file's own header states (MP4
-- moov/mvhd: archive/mp4.py) and hands it to rq_apply_measured_seconds, which prices the
-- row by the ledger's one pricing rule (rq_price_for at the row's creation, rq_cost_micros):
--
--   basis 'requested' / 'estimate' (or an earlier 'measured')  -> cost from the measured
--       seconds, cost_basis 'measured', billed_seconds = the measured seconds
--   basis 'billed'   -> fal's bill stands; our own figure beside it (computed_cost_micros)
--       is re-priced from the measured seconds when it was itself only a guess, so the
--       reconciliation shows a difference only where fal truly differs
--   basis 'computed' (the output documents its duration), 'unpriced', 'none' -> unchanged
--
-- A file whose length cannot be read keeps its estimate; the reason is recorded in
-- measured_seconds_problem. fal's billed figure still wins when it arrives later
-- (spend_apply_billed sets cost_basis 'billed' over any basis).

do $$
declare
  c record;
begin
  for c in
    select conname from pg_constraint
     where conrelid = 'generations'::regclass and contype = 'c'
       and pg_get_constraintdef(oid) like '%cost_basis%'
       and pg_get_constraintdef(oid) not like '%computed_cost_basis%'
  loop
    execute format('alter table generations drop constraint %I', c.conname);
  end loop;
end
$$;

alter table generations
  add constraint generations_cost_basis_check
    check (cost_basis in ('none', 'estimate', 'computed', 'requested', 'measured', 'billed',
                          'unpriced')),
  -- The length the archived file's header states (seconds), once read.
  add column measured_seconds numeric check (measured_seconds > 0),
  -- Why the archived file's length could not be read (null once it was read).
  add column measured_seconds_problem text;

-- Apply the length measured from generation `p_id`'s archived file (null seconds: it could
-- not be read, `p_problem` says why). Returns what it did: 'measured' (cost re-priced),
-- 'billed' (fal's bill kept, our figure beside it re-priced), 'kept' (the basis is better
-- than a measurement, or the row is not a completed, priced one), 'unreadable', or null
-- when no such generation exists.
create function rq_apply_measured_seconds(p_id bigint, p_seconds numeric, p_problem text)
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
