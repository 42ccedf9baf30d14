-- Named queries of the archive (renderqueue_pipeline/archive/).

-- name: archive_claim
-- Take up to %(limit)s due rows, nearest deadline first, and lease them so that a
-- concurrent run skips them; each row comes with its media files (rq_output_files).
with due as (
  select id
    from generations
   where status = 'completed' and archive_status = 'pending'
     and (archive_next_attempt_at is null or archive_next_attempt_at <= now())
   order by fal_expires_at nulls last, finished_at
   limit %(limit)s
     for update skip locked
)
update generations g
   set archive_next_attempt_at = now() + make_interval(secs => %(lease_seconds)s)
  from due
 where g.id = due.id
returning g.id, g.request_id, g.created_at, g.finished_at, g.fal_expires_at,
          g.archive_attempts,
          coalesce((select jsonb_agg(to_jsonb(f) order by f.ordinal)
                      from rq_output_files(g.outputs) f), '[]'::jsonb) as files;

-- name: archive_record_success
-- The row is archived once: a row another run already finished is left as it is.
update generations
   set archive_status = 'archived',
       archive_url = %(archive_url)s,
       archived_at = now(),
       archive_bytes = %(bytes)s,
       archive_sha256 = %(sha256)s,
       archive_attempts = archive_attempts + 1,
       archive_error = null,
       archive_failure = null,
       archive_next_attempt_at = null,
       fal_delete_status = case when %(delete_fal_copy)s then 'pending'
                                else fal_delete_status end
 where id = %(id)s and archive_status = 'pending'
returning id;

-- name: archive_record_file
insert into generation_files (generation_id, ordinal, source_url, file_name, content_type,
                              bytes, sha256, archive_url)
values (%(generation_id)s, %(ordinal)s, %(source_url)s, %(file_name)s, %(content_type)s,
        %(bytes)s, %(sha256)s, %(archive_url)s)
on conflict (generation_id, ordinal) do nothing;

-- name: archive_record_failure
-- lost: at once, never retried. permanent: failed at once. Otherwise retried with an
-- exponential backoff (never later than half the time left before fal's deadline) until
-- %(max_attempts)s attempts, then failed.
update generations
   set archive_attempts = archive_attempts + 1,
       archive_error = %(error)s,
       archive_failure = %(reason)s,
       archive_status = case
         when %(lost)s then 'lost'
         when %(permanent)s or archive_attempts + 1 >= %(max_attempts)s then 'failed'
         else 'pending' end,
       archive_next_attempt_at = case
         when %(lost)s or %(permanent)s or archive_attempts + 1 >= %(max_attempts)s then null
         else now() + least(
           make_interval(secs => least(%(backoff_seconds)s * power(2, archive_attempts),
                                       %(max_backoff_seconds)s)),
           greatest(make_interval(secs => %(min_backoff_seconds)s),
                    coalesce((fal_expires_at - now()) / 2, interval '100 years')))
         end
 where id = %(id)s and archive_status = 'pending'
returning archive_status, archive_attempts, archive_next_attempt_at;

-- name: archive_due_count
-- Rows a run would take now (bounded: the sensor only needs to know whether there is work).
select count(*) as due
  from (select 1
          from generations
         where status = 'completed' and archive_status = 'pending'
           and (archive_next_attempt_at is null or archive_next_attempt_at <= now())
         limit %(cap)s) d;

-- name: archive_health
-- What the checks report: lost outputs, the backlog's oldest row, rows near their deadline.
select
  (select count(*) from generations where archive_status = 'lost') as lost,
  (select count(*) from generations where archive_status = 'failed') as failed,
  (select count(*) from generations where archive_status = 'archived') as archived,
  (select count(*) from generations
    where status = 'completed' and archive_status = 'pending') as pending,
  (select min(finished_at) from generations
    where status = 'completed' and archive_status = 'pending') as oldest_pending_finished_at,
  (select count(*) from generations
    where status = 'completed' and archive_status = 'pending'
      and fal_expires_at < now() + %(deadline_hours)s * interval '1 hour') as near_deadline,
  (select min(fal_expires_at) from generations
    where status = 'completed' and archive_status = 'pending') as nearest_deadline,
  now() as checked_at;

-- name: archive_failures_by_reason
select archive_status, coalesce(archive_failure, 'unknown') as reason, count(*) as rows
  from generations
 where archive_status in ('failed', 'lost')
    or (archive_status = 'pending' and archive_failure is not null)
 group by 1, 2
 order by 1, 2;

-- name: archive_lost_sample
select request_id, archive_error, fal_expires_at
  from generations
 where archive_status = 'lost'
 order by finished_at desc
 limit %(limit)s;

-- name: archive_links
select g.request_id, g.archive_status, g.archive_error, f.ordinal, f.archive_url, f.file_name
  from generations g
  left join generation_files f on f.generation_id = g.id
 where g.request_id = %(request_id)s
 order by f.ordinal;

-- name: fal_delete_claim
-- Archived rows whose fal copy is still to delete, leased like archive_claim.
with due as (
  select id
    from generations
   where fal_delete_status = 'pending' and archive_status = 'archived'
     and (fal_delete_next_attempt_at is null or fal_delete_next_attempt_at <= now())
   order by fal_delete_next_attempt_at nulls first, id
   limit %(limit)s
     for update skip locked
)
update generations g
   set fal_delete_next_attempt_at = now() + make_interval(secs => %(lease_seconds)s)
  from due
 where g.id = due.id
returning g.id, g.request_id, g.endpoint, g.fal_delete_attempts;

-- name: fal_delete_record_answer
-- fal's answer for one file of the row (matched by its URL).
update generation_files
   set fal_delete_answer = %(answer)s, fal_delete_answered_at = now()
 where generation_id = %(generation_id)s and source_url = %(link)s;

-- name: fal_delete_record_done
update generations
   set fal_delete_status = 'deleted', fal_deleted_at = now(),
       fal_delete_attempts = fal_delete_attempts + 1, fal_delete_error = null,
       fal_delete_next_attempt_at = null
 where id = %(id)s and fal_delete_status = 'pending';

-- name: fal_delete_record_failure
update generations
   set fal_delete_attempts = fal_delete_attempts + 1,
       fal_delete_error = %(error)s,
       fal_delete_status = case when fal_delete_attempts + 1 >= %(max_attempts)s
                                then 'failed' else 'pending' end,
       fal_delete_next_attempt_at = case when fal_delete_attempts + 1 >= %(max_attempts)s
         then null
         else now() + make_interval(secs => least(%(backoff_seconds)s
                                                  * power(2, fal_delete_attempts),
                                                  %(max_backoff_seconds)s)) end
 where id = %(id)s and fal_delete_status = 'pending';

-- name: archive_apply_measured_seconds
-- The length the archived video's header states prices the row (null seconds: it could
-- not be read, and the reason is recorded): rq_apply_measured_seconds in sql/functions/ledger.sql.
select rq_apply_measured_seconds(%(id)s, %(seconds)s, %(problem)s) as applied;
