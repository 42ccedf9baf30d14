-- The archive: our own copy of every output file before fal's copy expires.
--
--   rq_output_files(outputs)    THE rule for which files an output has (Python asks it too)
--   generations_archive_backlog a completed row with media files joins the archive backlog
--   generation_files            one row per archived file (an output may have several)
--   generation_media            each generation's best link per file: ours when archived,
--                               fal's otherwise
--
-- archive_status: none | pending | archived | failed | lost. `lost` = fal's CDN answered
-- 404/410: the file is gone for good and is never fetched again.

do $$
declare
  c record;
begin
  for c in
    select conname from pg_constraint
     where conrelid = 'generations'::regclass and contype = 'c'
       and pg_get_constraintdef(oid) like '%archive_status%'
  loop
    execute format('alter table generations drop constraint %I', c.conname);
  end loop;
end
$$;

alter table generations
  add constraint generations_archive_status_check
    check (archive_status in ('none', 'pending', 'archived', 'failed', 'lost')),
  -- The deadline of fal's copy (the gateway sets it at submit from the lifecycle it asked
  -- for; null = no expiry asked). Defined here too so the archive does not depend on the
  -- order in which the two migrations land.
  add column if not exists fal_expires_at timestamptz,
  -- Not before: a claimed row's lease, or the backoff after a failed attempt.
  add column archive_next_attempt_at timestamptz,
  -- Why the last attempt failed, as a short code (gone, host_not_allowed, address_refused,
  -- too_large, length_mismatch, http_error, network, storage, no_media, bad_url).
  add column archive_failure text,
  -- Deleting fal's copy after a safe archive (RENDERQUEUE_DELETE_FAL_COPY=1).
  add column fal_delete_status text not null default 'none'
    check (fal_delete_status in ('none', 'pending', 'deleted', 'failed')),
  add column fal_delete_attempts integer not null default 0,
  add column fal_delete_next_attempt_at timestamptz,
  add column fal_delete_error text,
  add column fal_deleted_at timestamptz;

-- The media files of an output, in a stable order (ordinal 1 is the main file): every
-- JSON object anywhere in the output with an http(s) `url` (fal's File: url, content_type,
-- file_name, file_size), or the seed article's flat `video_url` shape.
create function rq_output_files(p_outputs jsonb)
returns table (ordinal integer, url text, file_name text, content_type text, file_size bigint)
language sql immutable parallel safe
as $$
  with recursive walk (path, node) as (
    select '{}'::text[], p_outputs
    union all
    select w.path || c.key, c.value
      from walk w
      cross join lateral (
        select e.key, e.value
          from jsonb_each(case when jsonb_typeof(w.node) = 'object' then w.node end) e
        union all
        select lpad((a.i - 1)::text, 8, '0'), a.value
          from jsonb_array_elements(case when jsonb_typeof(w.node) = 'array' then w.node end)
               with ordinality a (value, i)
      ) c
  ),
  files as (
    select path, node ->> 'url' as url, node ->> 'file_name' as file_name,
           node ->> 'content_type' as content_type,
           case when jsonb_typeof(node -> 'file_size') = 'number'
                then (node ->> 'file_size')::numeric::bigint end as file_size
      from walk
     where jsonb_typeof(node) = 'object' and jsonb_typeof(node -> 'url') = 'string'
       and node ->> 'url' ~* '^https?://'
    union all
    select '{}'::text[], p_outputs ->> 'video_url', p_outputs ->> 'file_name',
           p_outputs ->> 'content_type',
           case when jsonb_typeof(p_outputs -> 'file_size') = 'number'
                then (p_outputs ->> 'file_size')::numeric::bigint end
     where jsonb_typeof(p_outputs -> 'video_url') = 'string'
       and p_outputs ->> 'video_url' ~* '^https?://'
  )
  select (row_number() over (order by path))::integer, url, file_name, content_type, file_size
    from files
   order by path
$$;

-- A completed row whose output has media files joins the backlog, whichever writer
-- completed it and whatever shape its output has.
create function rq_archive_backlog() returns trigger
language plpgsql
as $$
begin
  if exists (select 1 from rq_output_files(new.outputs)) then
    new.archive_status := 'pending';
  end if;
  return new;
end
$$;

create trigger generations_archive_backlog
  before insert or update of status, outputs, archive_status on generations
  for each row
  when (new.status = 'completed' and new.archive_status = 'none' and new.outputs is not null)
  execute function rq_archive_backlog();

-- The archive's work list, nearest deadline first.
create index generations_archive_due_idx
  on generations (fal_expires_at nulls last, finished_at)
  where status = 'completed' and archive_status = 'pending';
-- Copies of fal's files still to delete.
create index generations_fal_delete_due_idx
  on generations (fal_delete_next_attempt_at nulls first)
  where fal_delete_status = 'pending';

create table generation_files (
  generation_id bigint not null references generations (id) on delete cascade,
  ordinal integer not null check (ordinal >= 1),
  source_url text not null,             -- fal's URL, as in outputs
  file_name text not null,              -- our object's name under the request's folder
  content_type text,
  bytes bigint not null check (bytes >= 0),
  sha256 text not null check (sha256 ~ '^[0-9a-f]{64}$'),
  archive_url text not null,            -- file:///... or s3://bucket/key
  archived_at timestamptz not null default now(),
  fal_delete_answer text,               -- 'deleted', or fal's exception text for this file
  fal_delete_answered_at timestamptz,
  primary key (generation_id, ordinal)
);

create view generation_media as
select g.id as generation_id,
       g.request_id,
       f.ordinal,
       case when a.archive_url is not null then a.archive_url
            when g.archive_status = 'lost' then null
            else f.url end as best_url,
       case when a.archive_url is not null then 'archive'
            when g.archive_status = 'lost' then 'lost'
            else 'fal' end as source,
       f.url as fal_url,
       a.archive_url,
       coalesce(f.file_name, a.file_name) as file_name,
       f.content_type,
       coalesce(a.bytes, f.file_size) as bytes,
       a.sha256,
       g.archive_status,
       g.fal_expires_at
  from generations g
 cross join lateral rq_output_files(g.outputs) f
  left join generation_files a
         on a.generation_id = g.id and a.ordinal = f.ordinal and g.archive_status = 'archived'
 where g.status = 'completed';
