-- The seed article's table, enum and four indexes, exactly: every query in the article
-- runs unchanged against this schema.

create type generation_status as enum (
  'submitted', 'in_progress', 'completed', 'failed', 'canceled'
);

create table generations (
  id bigserial primary key,
  request_id text not null,
  user_id bigint not null,
  endpoint text not null,
  inputs jsonb not null,
  outputs jsonb,
  status generation_status not null default 'submitted',
  cost_cents integer not null default 0,
  error text,
  created_at timestamptz not null default now(),
  finished_at timestamptz
);

create unique index generations_request_id_key
  on generations (request_id);
create index generations_user_created_idx
  on generations (user_id, created_at desc);
create index generations_endpoint_status_idx
  on generations (endpoint, status);
create index generations_inputs_gin_idx
  on generations using gin (inputs);
