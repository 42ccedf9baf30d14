-- The archive's rules: our own copy of every output file before fal's copy expires (the
-- columns are in sql/schema/30_generations.sql, generation_files in 45_archive.sql).
--
--   rq_output_files(outputs)    THE rule for which files an output has (Python asks it too)
--   generations_archive_backlog a completed row with media files joins the archive backlog
--   generation_media            each generation's best link per file: ours when archived,
--                               fal's otherwise (a view over rq_output_files, so it is
--                               defined here, after the function it reads)

-- The media files of an output, in a stable order (ordinal 1 is the main file): every
-- JSON object anywhere in the output with an http(s) `url` (fal's File: url, content_type,
-- file_name, file_size), or the seed article's flat `video_url` shape.
create or replace function rq_output_files(p_outputs jsonb)
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
create or replace function rq_archive_backlog() returns trigger
language plpgsql
as $$
begin
  if exists (select 1 from rq_output_files(new.outputs)) then
    new.archive_status := 'pending';
  end if;
  return new;
end
$$;

create or replace trigger generations_archive_backlog
  before insert or update of status, outputs, archive_status on generations
  for each row
  when (new.status = 'completed' and new.archive_status = 'none' and new.outputs is not null)
  execute function rq_archive_backlog();

-- Each generation's best link per file: ours when archived, fal's otherwise.
create or replace view generation_media as
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
