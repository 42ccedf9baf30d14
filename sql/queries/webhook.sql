-- The webhook receiver's own reads (its writes go through rq_record_events).

-- name: webhook_known_request_ids
-- Which of these request ids have a generation row (a late retry is accepted only for one).
select request_id from generations where request_id = any(%(request_ids)s);

-- name: webhook_probe
-- /healthz and /metrics: one cheap read, at most once a second per process.
select count(*) as waiting from generation_events where applied_at is null;
