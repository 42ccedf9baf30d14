-- The archive: our own copy of every output file before fal's copy expires. The rules
-- (which files an output has, the backlog trigger, each file's best link) are in
-- sql/functions/archive.sql; the archive's columns of a generation in 30_generations.sql.

-- One row per archived file (an output may have several).
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
