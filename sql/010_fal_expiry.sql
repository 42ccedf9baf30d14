-- The deadline of fal's copy of a generation's outputs: the submit time plus the
-- X-Fal-Object-Lifecycle-Preference the gateway sent (null: no expiry was asked for, or
-- the row was not submitted through the gateway). The archiver copies outputs before it.
alter table generations add column if not exists fal_expires_at timestamptz;

comment on column generations.fal_expires_at is
  'when fal deletes this generation''s output files, by the lifecycle asked for at submit';
