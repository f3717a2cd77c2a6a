-- llmbatching 0.1.0 to 0.2.0 (ALTER EXTENSION llmbatching UPDATE). Every change of the schema
-- since 0.1.0 is made here too, so that an updated database is the same as a fresh install
-- (tests/upgrade.rs compares them).

-- my_batches names each batch's provider (added last: a view's columns can only be appended).
CREATE OR REPLACE VIEW llmbatching.my_batches WITH (security_barrier) AS
SELECT b.id, b.endpoint, b.model, b.state, b.provider_status,
       count(*) AS requests,
       count(*) FILTER (WHERE r.state = 'submitted') AS in_flight,
       count(*) FILTER (WHERE r.state = 'completed') AS completed,
       count(*) FILTER (WHERE r.state = 'failed') AS failed,
       count(*) FILTER (WHERE r.state = 'cancelled') AS cancelled,
       coalesce(sum(r.input_tokens), 0) AS input_tokens,
       coalesce(sum(r.output_tokens), 0) AS output_tokens,
       b.created_at, b.submitted_at, b.ended_at, b.finished_at,
       b.provider
  FROM llmbatching.requests r
  JOIN llmbatching.batches b ON b.id = r.batch_id
 WHERE r.submitted_by = CURRENT_USER
 GROUP BY b.id;
