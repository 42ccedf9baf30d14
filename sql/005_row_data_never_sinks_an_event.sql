-- A generation row written by hand (the seed article's raw INSERT) may hold inputs the
-- submit path would have refused. Pricing must not raise on them: an error there would
-- sink every event for the row, and the webhook receiver's whole batch with it. A
-- `generate_audio` that is not a JSON boolean now counts as the default (audio on), where
-- the cast used to raise ("maybe"); the submit path refuses such inputs anyway.
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
