-- The reconciler's second work list: completed rows whose webhook carried no payload
-- (fal's payload_error). fal keeps a result for about an hour, so the reconciler fetches it
-- on its first pass; this index keeps that look-up small however many rows are finished.
-- (Open rows are found through generations_open_idx.)
create index generations_payload_missing_idx on generations (finished_at)
  where status = 'completed' and outputs is null;
