-- Paying less than half: identical requests are sent once, earlier answers can be reused, and
-- the cost of every answer, and what it saved, is visible.

-- Whether a request gives the same answer every time: embeddings and moderations do, and so
-- does a generation with temperature 0.
CREATE FUNCTION llmbatching.is_deterministic(endpoint text, body jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT endpoint IN ('/v1/embeddings', '/v1/moderations')
        OR (jsonb_typeof(body -> 'temperature') = 'number' AND (body ->> 'temperature')::numeric = 0)
$$;

-- Before a request is queued: if an identical request of the same role is still queued or in
-- flight, this one waits for its answer instead of being sent (reused_from names it); else,
-- if reuse applies, an identical answer completed within llmbatching.reuse_max_age is copied
-- and the request is completed at once. Reuse applies when the request's `reuse` says so, or,
-- when that is NULL, per llmbatching.reuse_answers: 'off', 'deterministic' (the default: only
-- requests that always give the same answer) or 'always'.
CREATE FUNCTION llmbatching.dedupe_request() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    leader  bigint;
    earlier record;
    mode    text := coalesce(current_setting('llmbatching.reuse_answers', true), 'deterministic');
    max_age interval := coalesce(nullif(current_setting('llmbatching.reuse_max_age', true), ''), '7d')::interval;
BEGIN
    -- A row restored from a dump keeps what it was (it carries its original created_at; a
    -- submission cannot set it).
    IF NEW.created_at <> now() THEN
        RETURN NEW;
    END IF;
    NEW.request_hash := sha256(convert_to(NEW.provider || ' ' || NEW.endpoint || ' ' || NEW.body::text, 'UTF8'));
    SELECT r.id INTO leader
      FROM llmbatching.requests r
     WHERE r.request_hash = NEW.request_hash AND r.submitted_by = NEW.submitted_by
       AND r.state IN ('queued', 'submitted') AND r.reused_from IS NULL
     ORDER BY r.id
     LIMIT 1;
    IF leader IS NOT NULL THEN
        NEW.reused_from := leader;
        RETURN NEW;
    END IF;
    IF coalesce(NEW.reuse, mode = 'always' OR (mode = 'deterministic' AND llmbatching.is_deterministic(NEW.endpoint, NEW.body))) THEN
        SELECT r.id, r.response, r.result_text, r.result_json, r.input_tokens, r.cached_tokens,
               r.output_tokens, r.reasoning_tokens
          INTO earlier
          FROM llmbatching.requests r
         WHERE r.request_hash = NEW.request_hash AND r.submitted_by = NEW.submitted_by
           AND r.state = 'completed' AND r.finished_at > now() - max_age
         ORDER BY r.finished_at DESC
         LIMIT 1;
        IF FOUND THEN
            NEW.state := 'completed';
            NEW.reused_from := earlier.id;
            NEW.response := earlier.response;
            NEW.result_text := earlier.result_text;
            NEW.result_json := earlier.result_json;
            NEW.input_tokens := earlier.input_tokens;
            NEW.cached_tokens := earlier.cached_tokens;
            NEW.output_tokens := earlier.output_tokens;
            NEW.reasoning_tokens := earlier.reasoning_tokens;
            NEW.finished_at := now();
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER dedupe_request BEFORE INSERT ON llmbatching.requests
    FOR EACH ROW EXECUTE FUNCTION llmbatching.dedupe_request();

-- The price row of a model sent through a provider (a server): a row for the server itself,
-- else for its kind, else (Azure OpenAI) OpenAI's; for the model itself, else for the model a
-- dated snapshot of it names ('gpt-4o-mini-2024-07-18', 'gpt-4-0613',
-- 'claude-sonnet-4-5-20250929'). Nothing else: a misspelled model is unpriced, not priced as
-- whatever its name starts with. Everything it calls is qualified: it is left without a pinned
-- search_path so that the cost views can inline it.
CREATE FUNCTION llmbatching.price_of(provider text, model text) RETURNS SETOF llmbatching.prices
LANGUAGE sql STABLE
AS $$
    SELECT p.*
      FROM (SELECT (SELECT pg_catalog.split_part(o, '=', 2)
                      FROM pg_catalog.pg_foreign_server s, pg_catalog.unnest(s.srvoptions) o
                     WHERE s.srvname OPERATOR(pg_catalog.=) price_of.provider
                       AND o OPERATOR(pg_catalog.~~) 'kind=%'
                     LIMIT 1) AS kind) k,
           llmbatching.prices p
     WHERE p.provider OPERATOR(pg_catalog.=) ANY (ARRAY[price_of.provider, k.kind,
                CASE WHEN k.kind OPERATOR(pg_catalog.=) 'azure' THEN 'openai' END])
       AND (p.model OPERATOR(pg_catalog.=) price_of.model
            OR (pg_catalog.starts_with(price_of.model, p.model OPERATOR(pg_catalog.||) '-')
                AND pg_catalog.substr(price_of.model, pg_catalog.length(p.model) OPERATOR(pg_catalog.+) 2)
                    OPERATOR(pg_catalog.~) '^([0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{8}|[0-9]{4})$'))
     ORDER BY p.provider OPERATOR(pg_catalog.=) price_of.provider DESC,
              p.provider OPERATOR(pg_catalog.=) k.kind DESC,
              pg_catalog.length(p.model) DESC
     LIMIT 1
$$;

-- The cost of every completed request: what it was billed through the batch API (nothing if its
-- answer was reused), what the same request would have cost through the standard API, and the
-- difference, in US dollars rounded to 10 decimal places. Token counts of reused answers are
-- those of the answer they reused. Prices come from llmbatching.price_of; a model without one
-- is unpriced (priced_as NULL, counted in `unpriced`).
CREATE VIEW llmbatching.request_costs AS
SELECT r.id, r.job, r.provider, r.model, r.endpoint, r.submitted_by, r.finished_at,
       r.reused_from IS NOT NULL AS reused,
       coalesce(r.input_tokens, 0) AS input_tokens,
       coalesce(r.cached_tokens, 0) AS cached_tokens,
       coalesce(r.output_tokens, 0) AS output_tokens,
       coalesce(r.reasoning_tokens, 0) AS reasoning_tokens,
       p.model AS priced_as,
       CASE WHEN r.reused_from IS NOT NULL THEN 0
            ELSE round(((coalesce(r.input_tokens, 0) - coalesce(r.cached_tokens, 0)) * p.batch_input
                        + coalesce(r.cached_tokens, 0) * coalesce(p.batch_cached_input, p.batch_input)
                        + coalesce(r.output_tokens, 0) * p.batch_output) / 1000000, 10) END AS cost,
       round(((coalesce(r.input_tokens, 0) - coalesce(r.cached_tokens, 0)) * p.input
              + coalesce(r.cached_tokens, 0) * coalesce(p.cached_input, p.input)
              + coalesce(r.output_tokens, 0) * p.output) / 1000000, 10) AS synchronous_cost
  FROM llmbatching.requests r
  LEFT JOIN LATERAL llmbatching.price_of(r.provider, r.model) p ON true
 WHERE r.state = 'completed';
COMMENT ON VIEW llmbatching.request_costs IS
    'Cost of each completed request in USD (batch price; 0 when reused) and what it would have cost synchronously';

-- Totals by job, by model and by day, computed once: the three views below read their rows.
CREATE VIEW llmbatching.cost_totals AS
SELECT job, model, (finished_at AT TIME ZONE 'UTC')::date AS day,
       GROUPING(job, model, (finished_at AT TIME ZONE 'UTC')::date) AS grouped_by,
       count(*) AS requests, count(*) FILTER (WHERE reused) AS reused,
       sum(input_tokens) AS input_tokens, sum(cached_tokens) AS cached_tokens,
       sum(output_tokens) AS output_tokens, sum(reasoning_tokens) AS reasoning_tokens,
       round(sum(cost), 6) AS cost, round(sum(synchronous_cost), 6) AS synchronous_cost,
       round(sum(synchronous_cost) - sum(cost), 6) AS saved,
       round(100 * (sum(synchronous_cost) - sum(cost)) / nullif(sum(synchronous_cost), 0), 1) AS saved_percent,
       count(*) FILTER (WHERE priced_as IS NULL) AS unpriced
  FROM llmbatching.request_costs
 GROUP BY GROUPING SETS ((job), (model), ((finished_at AT TIME ZONE 'UTC')::date));

-- grouped_by is GROUPING()'s bit mask: a 1 for each of job, model, day not grouped on.
CREATE VIEW llmbatching.cost_by_job AS
SELECT job, requests, reused, input_tokens, cached_tokens, output_tokens, reasoning_tokens,
       cost, synchronous_cost, saved, saved_percent, unpriced
  FROM llmbatching.cost_totals WHERE grouped_by = 3;

CREATE VIEW llmbatching.cost_by_model AS
SELECT model, requests, reused, input_tokens, cached_tokens, output_tokens, reasoning_tokens,
       cost, synchronous_cost, saved, saved_percent, unpriced
  FROM llmbatching.cost_totals WHERE grouped_by = 5;

CREATE VIEW llmbatching.cost_by_day AS
SELECT day, requests, reused, input_tokens, cached_tokens, output_tokens, reasoning_tokens,
       cost, synchronous_cost, saved, saved_percent, unpriced
  FROM llmbatching.cost_totals WHERE grouped_by = 6;
