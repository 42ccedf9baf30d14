-- fal's bill (sql/schema/60_billing.sql): nano-dollars to micro-dollars, once per request.

-- Micro-dollars from nano-dollars: summed first, then rounded once, half up (non-negative amounts).
create or replace function rq_nanos_to_micros(nanos bigint) returns bigint
language sql immutable parallel safe
as $$ select (nanos + 500) / 1000 $$;
