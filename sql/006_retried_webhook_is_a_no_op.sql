-- The seed article's webhook statement sets `finished_at = now()` every time it runs, so a
-- retried delivery moved the finish time of a row that had already finished. An UPDATE
-- that sets the status of a finished row to the status it already has (a retried
-- webhook) keeps the row's finished_at: the retry is a no-op. An UPDATE that does not
-- name the status (a correction of finished_at alone) is left as it is.
create function rq_generations_keep_finished_at() returns trigger
language plpgsql
as $$
begin
  new.finished_at := old.finished_at;
  return new;
end
$$;

create trigger generations_keep_finished_at
  before update of status on generations
  for each row
  when (old.status = new.status
        and old.status in ('completed', 'failed', 'canceled')
        and old.finished_at is not null)
  execute function rq_generations_keep_finished_at();
