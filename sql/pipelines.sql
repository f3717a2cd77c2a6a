-- Pipelines: jobs and their progress, waiting and notification, structured answers,
-- embeddings, and writing answers back into the rows they came from.

CREATE FUNCTION llm_answer_json(id bigint) RETURNS jsonb
LANGUAGE sql STABLE STRICT
AS $$ SELECT r.result_json FROM llmbatching.requests r WHERE r.id = llm_answer_json.id AND r.state = 'completed' $$;
COMMENT ON FUNCTION llm_answer_json(bigint) IS 'The structured answer of a completed llm_submit_json or llm_submit_label request';

CREATE FUNCTION llm_embedding(id bigint) RETURNS real[]
LANGUAGE plpgsql STABLE STRICT
AS $$
DECLARE
    r record;
BEGIN
    SELECT q.endpoint, q.state, q.response INTO r FROM llmbatching.requests q WHERE q.id = llm_embedding.id;
    IF FOUND AND r.endpoint <> '/v1/embeddings' THEN
        RAISE EXCEPTION 'invalid argument "id": request % is a % request, not an embedding', llm_embedding.id, r.endpoint
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Submit embeddings with llm_submit(model, input, endpoint => ''/v1/embeddings''); read other answers with llm_result.';
    END IF;
    IF NOT FOUND OR r.state <> 'completed' THEN
        RETURN NULL;
    END IF;
    RETURN ARRAY(SELECT e::real FROM jsonb_array_elements_text(r.response #> '{data,0,embedding}') AS e);
END
$$;
COMMENT ON FUNCTION llm_embedding(bigint) IS 'The embedding of a completed /v1/embeddings request (NULL until then)';

-- Progress of every job, computed from the reader's own requests only (the view runs with the
-- reader's privileges): the finish is extrapolated from how many have finished so far.
CREATE VIEW llmbatching.jobs AS
SELECT r.job,
       count(*) AS total,
       count(*) FILTER (WHERE r.state = 'queued') AS queued,
       count(*) FILTER (WHERE r.state = 'submitted') AS submitted,
       count(*) FILTER (WHERE r.state = 'completed') AS completed,
       count(*) FILTER (WHERE r.state = 'failed') AS failed,
       count(*) FILTER (WHERE r.state = 'cancelled') AS cancelled,
       round(100.0 * count(*) FILTER (WHERE r.state IN ('completed', 'failed', 'cancelled')) / count(*), 1) AS percent_done,
       coalesce(sum(r.input_tokens), 0) AS input_tokens,
       coalesce(sum(r.output_tokens), 0) AS output_tokens,
       min(r.created_at) AS started_at,
       -- Answers registered to be written into rows (llm_classify, llm_write_back): how many
       -- were, how many could not be, and why (the distinct reasons, at most five).
       count(w.request_id) AS write_backs,
       count(w.request_id) FILTER (WHERE w.outcome = 'written') AS written,
       count(w.request_id) FILTER (WHERE w.written_at IS NOT NULL AND w.outcome <> 'written') AS not_written,
       (array_agg(DISTINCT w.outcome) FILTER (WHERE w.written_at IS NOT NULL AND w.outcome <> 'written'))[1:5] AS not_written_reasons,
       CASE WHEN bool_and(r.state IN ('completed', 'failed', 'cancelled')) THEN max(r.finished_at)
            WHEN count(*) FILTER (WHERE r.state IN ('completed', 'failed', 'cancelled')) > 0
                THEN now() + (now() - min(r.created_at))
                     * ((count(*) FILTER (WHERE r.state IN ('queued', 'submitted')))::float8
                        / count(*) FILTER (WHERE r.state IN ('completed', 'failed', 'cancelled')))
       END AS estimated_finish
  FROM llmbatching.requests r
  LEFT JOIN llmbatching.writebacks w ON w.request_id = r.id
 WHERE r.job IS NOT NULL
 GROUP BY r.job;
COMMENT ON VIEW llmbatching.jobs IS 'Progress, tokens used and estimated finish of every job';

-- Each batch that carries the reader's requests, as far as those requests go: their counts and
-- tokens, never another role's. (The view reads the tables as its owner and keeps the rows of
-- the reading role; administrators read llmbatching.batches itself.)
CREATE VIEW llmbatching.my_batches WITH (security_barrier) AS
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
COMMENT ON VIEW llmbatching.my_batches IS 'The batches carrying your requests, with your requests'' counts and tokens only';

CREATE FUNCTION llm_job_status(job text) RETURNS llmbatching.jobs
LANGUAGE plpgsql STABLE STRICT
AS $$
DECLARE
    status llmbatching.jobs;
BEGIN
    SELECT * INTO status FROM llmbatching.jobs j WHERE j.job = llm_job_status.job;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'invalid argument "job": you have no requests with job %', pg_catalog.quote_literal(llm_job_status.job)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'SELECT job FROM llmbatching.jobs lists your jobs.';
    END IF;
    RETURN status;
END
$$;
COMMENT ON FUNCTION llm_job_status(text) IS 'One job''s progress, tokens used and estimated finish';

-- Waits until the requests (by id, or of a job) have all finished, and their answers are written
-- into the rows registered for them; true if they did within the timeout. Interruptible with pg_cancel_backend; reports progress as NOTICEs.
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
    no_worker   text;
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
    IF NOT EXISTS (SELECT FROM llmbatching.requests r
                    WHERE (llm_wait.ids IS NULL OR r.id = ANY (llm_wait.ids))
                      AND (llm_wait.job IS NULL OR r.job = llm_wait.job)) THEN
        IF llm_wait.job IS NOT NULL THEN
            RAISE EXCEPTION 'invalid argument "job": you have no requests with job %', quote_literal(llm_wait.job)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'SELECT job FROM llmbatching.jobs lists your jobs.';
        END IF;
        RAISE EXCEPTION 'invalid argument "ids": none of them is a request of yours'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Waiting on a database no worker serves would only ever time out.
    no_worker := llmbatching.worker_problem();
    IF no_worker IS NOT NULL THEN
        RAISE WARNING 'llm_wait: %', no_worker;
    END IF;
    deadline := clock_timestamp() + timeout;
    LOOP
        -- A request is open until it has finished and its answer is in the row registered for
        -- it (the worker writes answers back just after they arrive).
        SELECT count(*), count(*) FILTER (WHERE r.state IN ('queued', 'submitted')
                                             OR EXISTS (SELECT FROM llmbatching.writebacks w
                                                         WHERE w.request_id = r.id AND w.written_at IS NULL))
          INTO total, open
          FROM llmbatching.requests r
         WHERE (llm_wait.ids IS NULL OR r.id = ANY (llm_wait.ids))
           AND (llm_wait.job IS NULL OR r.job = llm_wait.job);
        IF open = 0 THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RAISE NOTICE 'llm_wait: timed out with % of % requests finished', total - open, total;
            IF no_worker IS NOT NULL THEN
                RAISE WARNING 'llm_wait: %', no_worker;
            END IF;
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

-- After every change of request states: identical requests waiting on a finished one take its
-- outcome, answers registered for a row are queued for the worker's write-back step, the
-- write-backs of requests that will never have an answer are settled, and each role whose
-- requests finished is notified on its own channel (llm_channel()), with no payload: a
-- notification only says "look again", and anyone may send one.
-- A request finished in this statement when it is in a final state with finished_at = now():
-- every move to a final state sets it, and a final state is never left. Reading only the new
-- rows (no join with the old ones) keeps the cost linear whatever plan is cached.
-- It runs as the extension's owner (a role cancelling its own request may not write the queue)
-- and touches only the extension's own tables: no code any role owns runs here.
CREATE FUNCTION llmbatching.requests_changed() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
-- Its statements join one statement's rows to the state tables: probes through their indexes,
-- never scans, whatever the planner's (often stale, mid-batch) statistics suggest.
SET enable_seqscan = off
AS $$
DECLARE
    completed bigint;
    settled   bigint;
    finished  bigint;
BEGIN
    SELECT count(*) FILTER (WHERE n.state = 'completed'),
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
    -- (Not when there are no write-backs at all.)
    IF EXISTS (SELECT FROM llmbatching.writebacks) THEN
        -- The answers go to the write-back queue in entries of up to 1,000 per role (those
        -- whose ids share their thousand), whether or not they have a write-back: the worker's
        -- write-back step finds out, one probe per answer, where looking here would cost that
        -- probe and a queue row per answer more.
        IF completed > 0 THEN
            INSERT INTO llmbatching.writeback_queue (submitted_by, request_ids)
            SELECT n.submitted_by, array_agg(n.id)
              FROM new_rows n
             WHERE n.state = 'completed' AND n.finished_at = now()
             GROUP BY n.submitted_by, n.id / 1000;
        END IF;
        UPDATE llmbatching.writebacks w
           SET written_at = now(), outcome = 'request ' || n.state
          FROM new_rows n
         WHERE w.request_id = n.id AND w.written_at IS NULL
           AND n.state IN ('failed', 'cancelled') AND n.finished_at = now();
    END IF;
    -- (A role dropped since it submitted has no channel left to notify.)
    PERFORM pg_notify('llmbatching_' || s.role::oid, '')
       FROM (SELECT to_regrole(quote_ident(d.submitted_by)) AS role
               FROM (SELECT DISTINCT n.submitted_by FROM new_rows n
                      WHERE n.state IN ('completed', 'failed', 'cancelled') AND n.finished_at = now()) AS d) AS s
      WHERE s.role IS NOT NULL;
    RETURN NULL;
END
$$;

CREATE TRIGGER requests_changed
    AFTER UPDATE ON llmbatching.requests
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llmbatching.requests_changed();

-- Deleted (purged) requests take their write-backs with them, but for one its role keeps
-- locked: waiting for it would hold up the purge of every role's rows. (llmbatching.purge_before
-- leaves requests whose write-backs are locked, so only one registered and locked while the
-- purge ran is left; its request gone, it is never written, nor counted anywhere.)
CREATE FUNCTION llmbatching.requests_deleted() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
BEGIN
    DELETE FROM llmbatching.writebacks w
     WHERE w.request_id IN (SELECT l.request_id FROM llmbatching.writebacks l
                             WHERE l.request_id IN (SELECT o.id FROM old_rows o)
                               FOR UPDATE OF l SKIP LOCKED);
    RETURN NULL;
END
$$;

CREATE TRIGGER requests_deleted
    AFTER DELETE ON llmbatching.requests
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llmbatching.requests_deleted();

-- A write-back registered (or registered again) for a request that already has its answer is
-- queued for the worker's write-back step at once. Only the rows being registered are queued,
-- and row-level security lets a role register only its own.
CREATE FUNCTION llmbatching.writebacks_registered() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET enable_seqscan = off
AS $$
DECLARE
    queued bigint;
BEGIN
    -- One answer per row and column: the newest request's. Older write-backs of the same row
    -- by the same role still waiting are superseded (another role's are not this role's to
    -- change), and a registration older than one already there is
    -- superseded at once, so an older answer never overwrites a newer one. Each registration
    -- meets the others of its row in one probe of their index: of each pair, the older one is
    -- superseded.
    UPDATE llmbatching.writebacks w
       SET written_at = now(), outcome = 'superseded'
      FROM (SELECT least(o.request_id, n.request_id) AS request_id
              FROM new_rows n
              JOIN llmbatching.writebacks o
                ON o.target = n.target AND o.target_column = n.target_column AND o.row_key = n.row_key
               AND o.submitted_by = n.submitted_by AND o.request_id <> n.request_id
            OFFSET 0) older
     WHERE w.request_id = older.request_id AND w.written_at IS NULL;
    -- Answers already in: queued in entries of up to 1,000 per role (those whose ids share
    -- their thousand). (One may already be in an entry, queued when it completed: the worker
    -- writes it once all the same, see llmbatching.writeback_queue.) Requests are looked at
    -- first, and only the answered ones' write-backs after: registrations are mostly for
    -- requests just submitted, and a second probe per row cost about 3 s of a million-row
    -- llm_classify.
    WITH q AS (
        INSERT INTO llmbatching.writeback_queue (submitted_by, request_ids)
        SELECT w.submitted_by, array_agg(w.request_id)
          FROM (SELECT n.request_id
                  FROM new_rows n
                  JOIN llmbatching.requests r ON r.id = n.request_id
                 WHERE r.state = 'completed'
                OFFSET 0) answered
          JOIN llmbatching.writebacks w ON w.request_id = answered.request_id
         WHERE w.written_at IS NULL
         GROUP BY w.submitted_by, w.request_id / 1000
        RETURNING 1)
    SELECT count(*) INTO queued FROM q;
    IF queued > 0 THEN
        PERFORM llmbatching.wake_worker();
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER writebacks_registered
    AFTER INSERT ON llmbatching.writebacks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION llmbatching.writebacks_registered();

-- Registered again (llm_write_back on a request that had one): the worker only ever changes
-- written_at and outcome, so this fires for a role's own registrations alone.
CREATE FUNCTION llmbatching.writeback_reregistered() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET enable_seqscan = off
AS $$
DECLARE
    holder xid;
BEGIN
    IF NEW.written_at IS NULL
       AND EXISTS (SELECT FROM llmbatching.requests r WHERE r.id = NEW.request_id AND r.state = 'completed') THEN
        IF (OLD.target, OLD.target_column, OLD.row_key) IS NOT DISTINCT FROM (NEW.target, NEW.target_column, NEW.row_key) THEN
            -- The same row and column: an answer already in an entry keeps it, with its count
            -- and its time (registering again never makes the worker try sooner or more
            -- often). But not an entry the worker is writing now, which may be about to leave
            -- the queue: the worker locks those (this registration skips them, or, when it
            -- comes from the role's own code the worker runs, finds the lock its own
            -- transaction's); the lock taken here holds the entry there until this commits.
            SELECT q.xmax INTO holder FROM llmbatching.writeback_queue q
             WHERE q.submitted_by = NEW.submitted_by AND NEW.request_id = ANY (q.request_ids)
             LIMIT 1
             FOR KEY SHARE SKIP LOCKED;
            IF FOUND AND holder IS DISTINCT FROM pg_current_xact_id_if_assigned()::xid THEN
                RETURN NULL;
            END IF;
        ELSE
            -- Another row or column starts afresh: the answer leaves the entries that counted
            -- tries at the old one (but one the worker is writing now, which writes it once).
            UPDATE llmbatching.writeback_queue q SET request_ids = array_remove(q.request_ids, NEW.request_id)
             WHERE q.id IN (SELECT e.id FROM llmbatching.writeback_queue e
                             WHERE e.submitted_by = NEW.submitted_by AND NEW.request_id = ANY (e.request_ids)
                               FOR UPDATE SKIP LOCKED);
        END IF;
        INSERT INTO llmbatching.writeback_queue (submitted_by, request_ids) VALUES (NEW.submitted_by, ARRAY[NEW.request_id]);
        PERFORM llmbatching.wake_worker();
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER writeback_reregistered
    AFTER UPDATE OF target, target_column, row_key ON llmbatching.writebacks
    FOR EACH ROW EXECUTE FUNCTION llmbatching.writeback_reregistered();

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
END
$$;
COMMENT ON FUNCTION llm_write_back(bigint, regclass, name, jsonb) IS
    'Writes a request''s answer into a column of the row with the given primary key when it arrives';

-- Submits one request for every row of `target` (optionally only rows matching `filter`, a
-- SQL condition) whose `prompt` (a SQL expression over the row, such as 'Classify: ' || body)
-- is not empty, and writes each answer into `target_column` of its row. With `labels` the
-- answer is one of them; with `schema` it is JSON following it. Returns the job name (by
-- default '<table>.<column>') and how many requests were submitted.
-- It keeps the caller's search_path and privileges, to evaluate the caller's own prompt and
-- filter; every function and operator it calls itself is therefore qualified, so that nothing
-- planted on that path can stand in for one.
CREATE FUNCTION llm_classify(target regclass, target_column name, prompt text, model text,
                             instructions text DEFAULT NULL, options jsonb DEFAULT '{}',
                             endpoint text DEFAULT NULL, job text DEFAULT NULL,
                             labels text[] DEFAULT NULL, schema jsonb DEFAULT NULL, filter text DEFAULT NULL,
                             provider text DEFAULT NULL)
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
    pending    bigint;
BEGIN
    IF prompt IS NULL OR pg_catalog.btrim(prompt) OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'invalid argument "prompt": give a SQL expression over the row, such as ''Classify: '' || body'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF labels IS NOT NULL AND schema IS NOT NULL THEN
        RAISE EXCEPTION 'invalid argument "schema": give labels or a schema, not both' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The prompt and the filter are SQL over the row: try them on no rows first, so that a
    -- mistake is an error naming the argument, not one about a statement the caller never wrote.
    BEGIN
        EXECUTE pg_catalog.format('SELECT (%s)::pg_catalog.text FROM %s AS t WHERE false', prompt, target::pg_catalog.text);
    EXCEPTION WHEN syntax_error_or_access_rule_violation OR data_exception THEN
        RAISE EXCEPTION 'invalid argument "prompt": %', SQLERRM
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'prompt is a SQL expression over each row of the table, such as ''Classify the sentiment of this review: '' || body (text in single quotes, columns by name).';
    END;
    IF filter IS NOT NULL THEN
        BEGIN
            EXECUTE pg_catalog.format('SELECT FROM %s AS t WHERE (%s) AND false', target::pg_catalog.text, filter);
        EXCEPTION WHEN syntax_error_or_access_rule_violation OR data_exception THEN
            RAISE EXCEPTION 'invalid argument "filter": %', SQLERRM
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'filter is a SQL condition over each row of the table, such as: sentiment IS NULL';
        END;
    END IF;
    job_name := coalesce(llm_classify.job,
                         pg_catalog.format('%s.%s', target::pg_catalog.text, target_column::pg_catalog.text));
    SELECT pg_catalog.string_agg(pg_catalog.format('%L, t.%I', c::pg_catalog.text, c::pg_catalog.text), ', ')
      INTO key_sql FROM pg_catalog.unnest(key_cols) AS c;
    submit_sql := CASE
        WHEN labels IS NOT NULL THEN '@extschema@.llm_submit_label($1, p.prompt, $5, $2, $3, $4, $6, provider => $8)'
        WHEN schema IS NOT NULL THEN '@extschema@.llm_submit_json($1, p.prompt, $7, $2, $3, $4, $6, provider => $8)'
        ELSE '@extschema@.llm_submit($1, p.prompt, $2, $3, $4, $6, provider => $8)'
    END;
    -- Submit first, register the write-backs in a second statement: the write-back policy
    -- checks that each request belongs to the caller, which needs the new requests visible.
    EXECUTE pg_catalog.format($sql$
        WITH p AS (SELECT pg_catalog.jsonb_build_object(%1$s) AS row_key, (%2$s)::pg_catalog.text AS prompt
                     FROM %3$s AS t WHERE %4$s),
             submitted AS (SELECT row_key, %5$s AS id FROM p
                            WHERE p.prompt IS NOT NULL AND pg_catalog.btrim(p.prompt) OPERATOR(pg_catalog.<>) '')
        SELECT pg_catalog.array_agg(s.id), pg_catalog.array_agg(s.row_key),
               (SELECT pg_catalog.count(*) FROM p) OPERATOR(pg_catalog.-) pg_catalog.count(s.id)
          FROM submitted s
        $sql$, key_sql, prompt, target::pg_catalog.text, coalesce(filter, 'true'), submit_sql)
    INTO ids, keys, skipped
    USING model, instructions, options, endpoint, labels, job_name, schema, provider;
    -- Rows that already wait for an answer into this column: the new requests supersede those
    -- write-backs (the earlier requests are still sent unless cancelled).
    SELECT pg_catalog.count(*) INTO pending
      FROM llmbatching.writebacks w
     WHERE w.target OPERATOR(pg_catalog.=) llm_classify.target
       AND w.target_column OPERATOR(pg_catalog.=) llm_classify.target_column
       AND w.written_at IS NULL;
    IF pending OPERATOR(pg_catalog.>) 0 THEN
        RAISE WARNING 'llm_classify: % write-backs into %.% were still waiting; the new requests supersede them (outcome ''superseded''), and the earlier requests are still sent unless cancelled', pending, target, target_column
            USING HINT = pg_catalog.format('Cancel them with: SELECT llm_cancel(request_id) FROM llmbatching.writebacks WHERE target = %L::regclass AND target_column = %L AND outcome = ''superseded''', target::pg_catalog.text, target_column::pg_catalog.text);
    END IF;
    INSERT INTO llmbatching.writebacks (request_id, target, target_column, row_key)
    SELECT s.id, llm_classify.target, llm_classify.target_column, s.row_key
      FROM ROWS FROM (pg_catalog.unnest(ids), pg_catalog.unnest(keys)) AS s (id, row_key);
    submitted := coalesce(pg_catalog.array_length(ids, 1), 0);
    IF skipped OPERATOR(pg_catalog.>) 0 THEN
        RAISE NOTICE 'llm_classify: skipped % rows whose prompt is NULL or empty', skipped;
    END IF;
    RETURN NEXT;
END
$$;
COMMENT ON FUNCTION llm_classify(regclass, name, text, text, text, jsonb, text, text, text[], jsonb, text, text) IS
    'Submits a request for every row of a table and writes each answer back into a column of its row';
