-- Pipelines: jobs and their progress, waiting and notification, structured answers,
-- embeddings, and writing answers back into the rows they came from.

CREATE FUNCTION llm_answer_json(id bigint) RETURNS jsonb
LANGUAGE sql STABLE STRICT
AS $$ SELECT r.result_json FROM llmbatching.requests r WHERE r.id = llm_answer_json.id AND r.state = 'completed' $$;
COMMENT ON FUNCTION llm_answer_json(bigint) IS 'The structured answer of a completed llm_submit_json or llm_submit_label request';

CREATE FUNCTION llm_embedding(id bigint) RETURNS real[]
LANGUAGE sql STABLE STRICT
AS $$
    SELECT ARRAY(SELECT e::real FROM jsonb_array_elements_text(r.response #> '{data,0,embedding}') AS e)
      FROM llmbatching.requests r
     WHERE r.id = llm_embedding.id AND r.state = 'completed' AND r.endpoint = '/v1/embeddings'
$$;
COMMENT ON FUNCTION llm_embedding(bigint) IS 'The embedding of a completed /v1/embeddings request';

-- Progress of every job. A submitted request counts as far along as its batch, by the
-- provider's request counts; the finish is extrapolated from the progress so far.
CREATE VIEW llmbatching.jobs AS
WITH per_request AS (
    SELECT r.job, r.state, r.input_tokens, r.output_tokens, r.created_at, r.finished_at,
           CASE WHEN r.state IN ('completed', 'failed', 'cancelled') THEN 1.0
                WHEN r.state = 'submitted' AND b.request_count > 0
                    THEN least(1.0, (b.completed_count + b.failed_count)::float8 / b.request_count)
                ELSE 0.0 END AS progress
      FROM llmbatching.requests r
      LEFT JOIN llmbatching.batches b ON b.id = r.batch_id AND r.state = 'submitted'
     WHERE r.job IS NOT NULL)
SELECT job,
       count(*) AS total,
       count(*) FILTER (WHERE state = 'queued') AS queued,
       count(*) FILTER (WHERE state = 'submitted') AS submitted,
       count(*) FILTER (WHERE state = 'completed') AS completed,
       count(*) FILTER (WHERE state = 'failed') AS failed,
       count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
       round(100.0 * count(*) FILTER (WHERE state IN ('completed', 'failed', 'cancelled')) / count(*), 1) AS percent_done,
       coalesce(sum(input_tokens), 0) AS input_tokens,
       coalesce(sum(output_tokens), 0) AS output_tokens,
       min(created_at) AS started_at,
       CASE WHEN bool_and(state IN ('completed', 'failed', 'cancelled')) THEN max(finished_at)
            WHEN sum(progress) > 0
                THEN now() + (now() - min(created_at)) * ((count(*) - sum(progress)) / sum(progress))
       END AS estimated_finish
  FROM per_request
 GROUP BY job;
COMMENT ON VIEW llmbatching.jobs IS 'Progress, tokens used and estimated finish of every job';

CREATE FUNCTION llm_job_status(job text) RETURNS llmbatching.jobs
LANGUAGE sql STABLE STRICT
AS $$ SELECT * FROM llmbatching.jobs j WHERE j.job = llm_job_status.job $$;
COMMENT ON FUNCTION llm_job_status(text) IS 'One job''s progress, tokens used and estimated finish';

-- Waits until the requests (by id, or of a job) have all finished; true if they did within
-- the timeout. Interruptible with pg_cancel_backend; reports progress as NOTICEs.
CREATE FUNCTION llm_wait(ids bigint[] DEFAULT NULL, job text DEFAULT NULL,
                         timeout interval DEFAULT '1 hour', report_every interval DEFAULT '10 seconds')
RETURNS boolean
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    deadline    timestamptz;
    next_report timestamptz := clock_timestamp() + coalesce(report_every, '10 seconds');
    total       bigint;
    open        bigint;
    pause       float8 := 0.05;
BEGIN
    IF ids IS NULL AND job IS NULL THEN
        RAISE EXCEPTION 'invalid argument "ids": give the request ids or a job to wait for'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout IS NULL OR timeout < interval '0' THEN
        RAISE EXCEPTION 'invalid argument "timeout": must be a positive interval' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'llm_wait needs READ COMMITTED isolation to see the answers arrive'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    IF EXISTS (SELECT FROM llmbatching.requests r
                WHERE (llm_wait.ids IS NULL OR r.id = ANY (llm_wait.ids))
                  AND (llm_wait.job IS NULL OR r.job = llm_wait.job)
                  AND r.xmin = pg_current_xact_id_if_assigned()::xid) THEN
        RAISE EXCEPTION 'the requests to wait for were submitted in this transaction; commit it first'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    deadline := clock_timestamp() + timeout;
    LOOP
        SELECT count(*), count(*) FILTER (WHERE r.state IN ('queued', 'submitted'))
          INTO total, open
          FROM llmbatching.requests r
         WHERE (llm_wait.ids IS NULL OR r.id = ANY (llm_wait.ids))
           AND (llm_wait.job IS NULL OR r.job = llm_wait.job);
        IF open = 0 THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RAISE NOTICE 'llm_wait: timed out with % of % requests finished', total - open, total;
            RETURN false;
        END IF;
        IF clock_timestamp() >= next_report THEN
            RAISE NOTICE 'llm_wait: % of % requests finished', total - open, total;
            next_report := clock_timestamp() + coalesce(report_every, '10 seconds');
        END IF;
        PERFORM pg_sleep(greatest(0, least(pause, extract(epoch FROM deadline - clock_timestamp()))));
        pause := least(pause * 2, 1.0);
    END LOOP;
END
$$;
COMMENT ON FUNCTION llm_wait(bigint[], text, interval, interval) IS
    'Waits for requests or a job to finish; true if all did before the timeout';

CREATE FUNCTION llmbatching.primary_key_columns(target regclass) RETURNS name[]
LANGUAGE sql STABLE STRICT
AS $$
    SELECT array_agg(a.attname ORDER BY k.ord)
      FROM pg_index i
     CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k (attnum, ord)
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = target AND i.indisprimary
$$;

-- Writes the answers of completed requests into the rows registered for them. The write runs
-- as the role that registered it, so it succeeds only where that role may UPDATE the column
-- itself (row-level security and triggers of the target apply as for that role). Each target
-- column is written in its own exception block, so a dropped column, a failed cast, a refused
-- privilege or a rejecting trigger is recorded against those write-backs and never stops the rest.
-- The value follows the column's type: json/jsonb take the structured answer (or the text as a
-- JSON string); real[], double precision[] and numeric[] take an embedding, and so does
-- pgvector's vector; any other type takes the answer text, cast.
-- Each call writes one chunk of answers into tables that may hold millions of rows: it must
-- find those rows through their primary key, never by scanning the table, whatever the
-- planner guesses about the chunk (sequential scans are therefore disabled while it runs).
-- The chunk's ids drive the join, from a subquery the planner may not flatten (OFFSET 0) that
-- also carries the target and the state wanted: so no condition narrows the requests or the
-- write-backs on its own, and each id is one probe of each primary key. Written as conditions
-- on the tables, stale statistics let the planner start from every completed request (through
-- requests_finished) and probe the write-backs with the whole id array each time.
CREATE FUNCTION llmbatching.write_back(ids bigint[]) RETURNS void
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    t         record;
    key_cols  name[];
    col_type  text;
    value_sql text;
    t_key     text;
    src_key   text;
    own_role  text := current_setting('role');
    written_ids bigint[];
BEGIN
    FOR t IN SELECT DISTINCT w.target, w.target_column, w.submitted_by
               FROM llmbatching.writebacks w
              WHERE w.request_id = ANY (ids) AND w.written_at IS NULL
    LOOP
        BEGIN
            IF t.submitted_by <> current_user THEN
                PERFORM set_config('role', t.submitted_by, true);
            END IF;
            key_cols := llmbatching.primary_key_columns(t.target);
            IF key_cols IS NULL THEN
                RAISE EXCEPTION 'table % has no primary key', t.target;
            END IF;
            SELECT format_type(a.atttypid, a.atttypmod) INTO col_type
              FROM pg_attribute a
             WHERE a.attrelid = t.target AND a.attname = t.target_column AND a.attnum > 0 AND NOT a.attisdropped;
            IF col_type IS NULL THEN
                RAISE EXCEPTION 'column % of % does not exist', t.target_column, t.target;
            END IF;
            value_sql := CASE
                WHEN col_type IN ('jsonb', 'json') THEN format('coalesce(r.result_json, to_jsonb(r.result_text))::%s', col_type)
                WHEN col_type IN ('real[]', 'double precision[]', 'numeric[]')
                    THEN format('ARRAY(SELECT e::float8 FROM jsonb_array_elements_text(r.response #> ''{data,0,embedding}'') e)::%s', col_type)
                WHEN col_type LIKE 'vector%' THEN format('(r.response #>> ''{data,0,embedding}'')::%s', col_type)
                ELSE format('r.result_text::%s', col_type)
            END;
            SELECT string_agg(format('t.%I', c), ', '), string_agg(format('(src.k).%I', c), ', ')
              INTO t_key, src_key
              FROM unnest(key_cols) AS c;
            EXECUTE format($sql$
                WITH src AS (
                    SELECT w.request_id, %1$s AS value, jsonb_populate_record(NULL::%2$s, w.row_key) AS k
                      FROM (SELECT i.id, $2::regclass AS target, $3::name AS target_column,
                                   $4::name AS submitted_by, 'completed'::text AS state
                              FROM unnest($1) AS i (id) OFFSET 0) i
                      JOIN llmbatching.writebacks w
                        ON w.request_id = i.id AND w.target = i.target AND w.target_column = i.target_column
                       AND w.submitted_by = i.submitted_by
                      JOIN llmbatching.requests r ON r.id = i.id AND r.state = i.state
                     WHERE w.written_at IS NULL),
                written AS (
                    UPDATE %2$s AS t SET %3$I = src.value FROM src WHERE (%4$s) = (%5$s)
                    RETURNING src.request_id)
                SELECT coalesce(array_agg(request_id), '{}') FROM written
                $sql$, value_sql, t.target, t.target_column, t_key, src_key)
            INTO written_ids
            USING ids, t.target, t.target_column, t.submitted_by;
            -- A second statement, so that the written ids are a constant the test below hashes.
            EXECUTE $sql$
                UPDATE llmbatching.writebacks w
                   SET written_at = now(),
                       outcome = CASE WHEN w.request_id = ANY ($5) THEN 'written' ELSE 'row missing' END
                 WHERE w.request_id = ANY ($1) AND w.target = $2 AND w.target_column = $3
                   AND w.submitted_by = $4 AND w.written_at IS NULL
                $sql$
            USING ids, t.target, t.target_column, t.submitted_by, written_ids;
            PERFORM set_config('role', own_role, true);
        EXCEPTION WHEN OTHERS THEN
            -- Leaving the block undid the role change.
            UPDATE llmbatching.writebacks w
               SET written_at = now(), outcome = 'error: ' || SQLERRM
             WHERE w.request_id = ANY (ids) AND w.target = t.target AND w.target_column = t.target_column
               AND w.submitted_by = t.submitted_by AND w.written_at IS NULL;
        END;
    END LOOP;
END
$$;

-- After every change of request states: write answers back, settle the write-backs of
-- requests that will never have one, and notify listeners.
--   channel llmbatching_request, payload '<id> <state>': a request finished
--   channel llmbatching_job,     payload '<job>':        a job has nothing left queued or submitted
-- A request finished in this statement when it is in a final state with finished_at = now():
-- every move to a final state sets it, and a final state is never left. Reading only the new
-- rows (no join with the old ones) keeps the cost linear whatever plan is cached.
CREATE FUNCTION llmbatching.requests_changed() RETURNS trigger
LANGUAGE plpgsql
-- Its statements join one statement's rows to the state tables: probes through their indexes,
-- never scans, whatever the planner's (often stale, mid-batch) statistics suggest.
SET enable_seqscan = off
AS $$
DECLARE
    completed bigint[];
    settled   bigint;
    finished  bigint;
BEGIN
    SELECT array_agg(n.id) FILTER (WHERE n.state = 'completed'),
           count(*) FILTER (WHERE n.state IN ('completed', 'failed')),
           count(*)
      INTO completed, settled, finished
      FROM new_rows n
     WHERE n.state IN ('completed', 'failed', 'cancelled') AND n.finished_at = now();
    IF finished = 0 THEN
        RETURN NULL;
    END IF;
    -- Identical requests that waited on a finished one take its outcome (this fires the
    -- trigger again for them: their write-backs and notifications follow). Only the worker
    -- completes or fails requests; a role's own cancellations never get here.
    -- (Most of the time nothing waits: one look at the index of waiting requests then spares a
    -- probe per finished request.)
    IF settled > 0 AND EXISTS (SELECT FROM llmbatching.requests w
                                WHERE w.state = 'queued' AND w.reused_from IS NOT NULL) THEN
        UPDATE llmbatching.requests f
           SET state = n.state, response = n.response, result_text = n.result_text, result_json = n.result_json,
               error = n.error, input_tokens = n.input_tokens, cached_tokens = n.cached_tokens,
               output_tokens = n.output_tokens, reasoning_tokens = n.reasoning_tokens, finished_at = now()
          FROM new_rows n
         WHERE f.reused_from = n.id AND f.state = 'queued'
           AND n.state IN ('completed', 'failed') AND n.finished_at = now();
    END IF;
    -- (Looking for write-backs costs a probe per answer: not when there are none at all.)
    IF completed IS NOT NULL AND EXISTS (SELECT FROM llmbatching.writebacks) THEN
        PERFORM llmbatching.write_back(completed);
    END IF;
    UPDATE llmbatching.writebacks w
       SET written_at = now(), outcome = 'request ' || n.state
      FROM new_rows n
     WHERE w.request_id = n.id AND w.written_at IS NULL
       AND n.state IN ('failed', 'cancelled') AND n.finished_at = now();
    PERFORM pg_notify('llmbatching_request', n.id || ' ' || n.state)
       FROM new_rows n
      WHERE n.state IN ('completed', 'failed', 'cancelled') AND n.finished_at = now();
    PERFORM pg_notify('llmbatching_job', j.job)
       FROM (SELECT DISTINCT n.job FROM new_rows n
              WHERE n.job IS NOT NULL AND n.state IN ('completed', 'failed', 'cancelled') AND n.finished_at = now()) AS j
      WHERE NOT EXISTS (SELECT FROM llmbatching.requests r WHERE r.job = j.job AND r.state IN ('queued', 'submitted'));
    RETURN NULL;
END
$$;

CREATE TRIGGER requests_changed
    AFTER UPDATE ON llmbatching.requests
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llmbatching.requests_changed();

-- Deleted (purged) requests take their write-backs with them.
CREATE FUNCTION llmbatching.requests_deleted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    DELETE FROM llmbatching.writebacks w USING old_rows o WHERE w.request_id = o.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER requests_deleted
    AFTER DELETE ON llmbatching.requests
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llmbatching.requests_deleted();

-- Checks a write-back target and returns its primary key columns.
CREATE FUNCTION llmbatching.check_target(target regclass, target_column name) RETURNS name[]
LANGUAGE plpgsql STABLE
AS $$
DECLARE
    key_cols name[];
BEGIN
    IF target IS NULL THEN
        RAISE EXCEPTION 'invalid argument "target": must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    key_cols := llmbatching.primary_key_columns(target);
    IF key_cols IS NULL THEN
        RAISE EXCEPTION 'invalid argument "target": table % has no primary key to find its rows by', target
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF target_column IS NULL OR NOT EXISTS (
            SELECT FROM pg_attribute a
             WHERE a.attrelid = target AND a.attname = target_column AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'invalid argument "target_column": table % has no column %', target, coalesce(target_column, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT has_column_privilege(target, target_column::text, 'UPDATE') THEN
        RAISE EXCEPTION 'invalid argument "target_column": permission denied to update %.%', target, target_column
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF target_column = ANY (key_cols) THEN
        RAISE EXCEPTION 'invalid argument "target_column": % is part of the primary key', target_column
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN key_cols;
END
$$;

-- Writes the answer of one request into `target_column` of the row of `target` whose primary
-- key is `row_key` (a JSON object of the key columns) when it arrives, or now if it already has.
CREATE FUNCTION llm_write_back(id bigint, target regclass, target_column name, row_key jsonb) RETURNS void
LANGUAGE plpgsql
AS $$
DECLARE
    key_cols name[] := llmbatching.check_target(target, target_column);
    state    text;
BEGIN
    SELECT r.state INTO state FROM llmbatching.requests r WHERE r.id = llm_write_back.id;
    IF state IS NULL THEN
        RAISE EXCEPTION 'invalid argument "id": no request %', coalesce(llm_write_back.id::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(row_key) IS DISTINCT FROM 'object' OR NOT row_key ?& key_cols::text[] THEN
        RAISE EXCEPTION 'invalid argument "row_key": must be a JSON object with the key columns %', key_cols
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO llmbatching.writebacks AS w (request_id, target, target_column, row_key)
    VALUES (llm_write_back.id, llm_write_back.target, llm_write_back.target_column, llm_write_back.row_key)
    ON CONFLICT (request_id) DO UPDATE
        SET target = excluded.target, target_column = excluded.target_column, row_key = excluded.row_key,
            written_at = NULL, outcome = NULL;
    IF state = 'completed' THEN
        PERFORM llmbatching.write_back(ARRAY[llm_write_back.id]);
    END IF;
END
$$;
COMMENT ON FUNCTION llm_write_back(bigint, regclass, name, jsonb) IS
    'Writes a request''s answer into a column of the row with the given primary key when it arrives';

-- Submits one request for every row of `target` (optionally only rows matching `filter`, a
-- SQL condition) whose `prompt` (a SQL expression over the row, such as 'Classify: ' || body)
-- is not empty, and writes each answer into `target_column` of its row. With `labels` the
-- answer is one of them; with `schema` it is JSON following it. Returns the job name (by
-- default '<table>.<column>') and how many requests were submitted.
CREATE FUNCTION llm_classify(target regclass, target_column name, prompt text, model text,
                             instructions text DEFAULT NULL, options jsonb DEFAULT '{}',
                             endpoint text DEFAULT '/v1/responses', job text DEFAULT NULL,
                             labels text[] DEFAULT NULL, schema jsonb DEFAULT NULL, filter text DEFAULT NULL)
RETURNS TABLE (job_name text, submitted bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    key_cols   name[] := llmbatching.check_target(target, target_column);
    key_sql    text;
    submit_sql text;
    skipped    bigint;
    ids        bigint[];
    keys       jsonb[];
BEGIN
    IF prompt IS NULL OR btrim(prompt) = '' THEN
        RAISE EXCEPTION 'invalid argument "prompt": give a SQL expression over the row, such as ''Classify: '' || body'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF labels IS NOT NULL AND schema IS NOT NULL THEN
        RAISE EXCEPTION 'invalid argument "schema": give labels or a schema, not both' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    job_name := coalesce(llm_classify.job, format('%s.%s', target, target_column));
    SELECT string_agg(format('%L, t.%I', c, c), ', ') INTO key_sql FROM unnest(key_cols) AS c;
    submit_sql := CASE
        WHEN labels IS NOT NULL THEN '@extschema@.llm_submit_label($1, p.prompt, $5, $2, $3, $4, $6)'
        WHEN schema IS NOT NULL THEN '@extschema@.llm_submit_json($1, p.prompt, $7, $2, $3, $4, $6)'
        ELSE '@extschema@.llm_submit($1, p.prompt, $2, $3, $4, $6)'
    END;
    -- Submit first, register the write-backs in a second statement: the write-back policy
    -- checks that each request belongs to the caller, which needs the new requests visible.
    EXECUTE format($sql$
        WITH p AS (SELECT jsonb_build_object(%1$s) AS row_key, (%2$s)::text AS prompt
                     FROM %3$s AS t WHERE %4$s),
             submitted AS (SELECT row_key, %5$s AS id FROM p WHERE p.prompt IS NOT NULL AND btrim(p.prompt) <> '')
        SELECT array_agg(s.id), array_agg(s.row_key), (SELECT count(*) FROM p) - count(s.id)
          FROM submitted s
        $sql$, key_sql, prompt, target, coalesce(filter, 'true'), submit_sql)
    INTO ids, keys, skipped
    USING model, instructions, options, endpoint, labels, job_name, schema;
    INSERT INTO llmbatching.writebacks (request_id, target, target_column, row_key)
    SELECT s.id, llm_classify.target, llm_classify.target_column, s.row_key
      FROM unnest(ids, keys) AS s (id, row_key);
    submitted := coalesce(cardinality(ids), 0);
    IF skipped > 0 THEN
        RAISE NOTICE 'llm_classify: skipped % rows whose prompt is NULL or empty', skipped;
    END IF;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION llm_classify(regclass, name, text, text, text, jsonb, text, text, text[], jsonb, text) IS
    'Submits a request for every row of a table and writes each answer back into a column of its row';
