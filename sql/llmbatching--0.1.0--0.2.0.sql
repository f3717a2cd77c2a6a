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

-- Operations: this database's worker can be started without preloading, restarted, and the
-- workers' state read (for administrators).
CREATE FUNCTION llmbatching.llm_worker_start() RETURNS integer
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'llm_worker_start_wrapper';
CREATE FUNCTION llmbatching.start_worker_if_needed() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'start_worker_if_needed_wrapper';

-- The workers, for administrators: which run, where, doing what (see also llm_worker_start,
-- in Rust). A worker serves one database; the launcher starts the one of llmbatching.database,
-- CREATE EXTENSION or llm_worker_start() the one of any other.
CREATE FUNCTION llmbatching.llm_worker_status()
RETURNS TABLE (pid integer, database name, started_at timestamptz, state text, doing text,
               batches_in_flight bigint, last_error text)
LANGUAGE sql STABLE SECURITY DEFINER
AS $$
    SELECT a.pid, a.datname, a.backend_start, a.state, NULLIF(a.query, ''),
           CASE WHEN a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database() THEN
               (SELECT pg_catalog.count(*) FROM llmbatching.batches b WHERE b.state OPERATOR(pg_catalog.<>) 'done') END,
           CASE WHEN a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database() THEN
               (SELECT b.last_error FROM llmbatching.batches b
                 WHERE b.last_error IS NOT NULL AND b.state OPERATOR(pg_catalog.<>) 'done'
                 ORDER BY b.id DESC LIMIT 1) END
      FROM pg_catalog.pg_stat_activity a
     WHERE a.backend_type OPERATOR(pg_catalog.=) 'llmbatching worker'
       AND a.datname IS NOT NULL  -- (a worker still starting serves no database yet)
     ORDER BY a.datname, a.pid
$$;
COMMENT ON FUNCTION llmbatching.llm_worker_status() IS 'The llmbatching workers of the cluster: pid, database, what each is doing; batches in flight and the last error for this database';

-- Restarts this database's worker: stops it (waiting up to 10 seconds), then the launcher
-- starts it again, or, where the launcher does not serve this database, this function does.
-- True if one was running.
CREATE FUNCTION llmbatching.llm_worker_restart() RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
AS $$
DECLARE
    stopped boolean;
BEGIN
    SELECT coalesce(pg_catalog.bool_or(pg_catalog.pg_terminate_backend(a.pid, 10000)), false) INTO stopped
      FROM pg_catalog.pg_stat_activity a
     WHERE a.backend_type OPERATOR(pg_catalog.=) 'llmbatching worker'
       AND a.datname OPERATOR(pg_catalog.=) pg_catalog.current_database();
    PERFORM llmbatching.start_worker_if_needed();
    RETURN stopped;
END
$$;
COMMENT ON FUNCTION llmbatching.llm_worker_restart() IS 'Restarts this database''s llmbatching worker';

REVOKE ALL ON FUNCTION llmbatching.llm_worker_start(), llmbatching.start_worker_if_needed(),
    llmbatching.llm_worker_status(), llmbatching.llm_worker_restart() FROM PUBLIC;
ALTER FUNCTION llmbatching.llm_worker_start() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION llmbatching.start_worker_if_needed() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION llmbatching.llm_worker_status() SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION llmbatching.llm_worker_restart() SET search_path = pg_catalog, pg_temp;
GRANT EXECUTE ON FUNCTION llmbatching.llm_worker_start(), llmbatching.llm_worker_status(),
    llmbatching.llm_worker_restart() TO llmbatching_admin;


-- The cancelled requests of each batch (see schema.sql).
CREATE INDEX requests_cancelled ON llmbatching.requests (batch_id) WHERE state = 'cancelled' AND batch_id IS NOT NULL;

-- The queues carry each body's size (and when it was queued), so that the worker measures a
-- group and plans its batch without a probe of the table per request.
DROP INDEX llmbatching.requests_queue;
CREATE INDEX requests_queue ON llmbatching.requests (provider, account, endpoint, model, id)
    INCLUDE (body_bytes, queued_at)
    WHERE state = 'queued' AND reused_from IS NULL;
DROP INDEX llmbatching.requests_queue_by_role;
CREATE INDEX requests_queue_by_role ON llmbatching.requests (provider, account, endpoint, model, submitted_by, id)
    INCLUDE (body_bytes)
    WHERE state = 'queued' AND reused_from IS NULL;

-- Registering write-backs meets the other registrations of each row in one probe, not two.
CREATE OR REPLACE FUNCTION llmbatching.writebacks_registered() RETURNS trigger
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
ALTER FUNCTION llmbatching.writebacks_registered() SET search_path = pg_catalog, pg_temp;

-- The write-back queue holds entries of up to 1,000 answers of a role, not one row per answer
-- (see schema.sql): the answers queued before stay queued, in entries of up to 1,000 of a role
-- that have been tried as often.
ALTER TABLE llmbatching.writeback_queue
    DROP CONSTRAINT writeback_queue_pkey,
    ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY,
    ADD COLUMN request_ids bigint[];
INSERT INTO llmbatching.writeback_queue (request_id, submitted_by, request_ids, due_at, tries, slow_tries)
SELECT pg_catalog.min(q.request_id), q.submitted_by, pg_catalog.array_agg(q.request_id),
       pg_catalog.max(q.due_at), q.tries, q.slow_tries
  FROM llmbatching.writeback_queue q
 GROUP BY q.submitted_by, q.tries, q.slow_tries, q.request_id OPERATOR(pg_catalog./) 1000;
DELETE FROM llmbatching.writeback_queue q WHERE q.request_ids IS NULL;
ALTER TABLE llmbatching.writeback_queue
    ALTER COLUMN request_ids SET NOT NULL,
    DROP COLUMN request_id,
    ADD PRIMARY KEY (id),
    ADD COLUMN answers integer NOT NULL GENERATED ALWAYS AS (pg_catalog.cardinality(request_ids)) STORED;
SELECT pg_catalog.pg_extension_config_dump('llmbatching.writeback_queue_id_seq', '');
-- Answers kept while their role holds their request locked (see schema.sql).
CREATE TABLE llmbatching.held_answers (
    request_id  bigint PRIMARY KEY,
    batch_id    bigint NOT NULL,
    -- The request's role: each role's kept answers are looked at in turn.
    submitted_by name NOT NULL,
    result      text NOT NULL,
    held_since  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    tries       integer NOT NULL DEFAULT 0,
    next_try_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX held_answers_due ON llmbatching.held_answers (next_try_at);
CREATE INDEX held_answers_role ON llmbatching.held_answers (submitted_by, next_try_at);
COMMENT ON TABLE llmbatching.held_answers IS 'Answers kept until the role holding their request locked lets go';
SELECT pg_catalog.pg_extension_config_dump('llmbatching.held_answers', '');
-- It holds answers of every role: the worker's alone.
REVOKE ALL ON llmbatching.held_answers FROM PUBLIC;
CREATE OR REPLACE FUNCTION llmbatching.requests_changed() RETURNS trigger
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
ALTER FUNCTION llmbatching.requests_changed() SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION llmbatching.writeback_reregistered() RETURNS trigger
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
ALTER FUNCTION llmbatching.writeback_reregistered() SET search_path = pg_catalog, pg_temp;
-- The purge leaves rows their role keeps locked for a later purge (see security.sql).
CREATE OR REPLACE FUNCTION llmbatching.purge_before(cutoff timestamptz, OUT requests bigint, OUT batches bigint)
LANGUAGE plpgsql STRICT
-- (As the extension's owner: locking a row to skip a held one takes UPDATE rights no policy
-- gives on finished rows. Only administrators and the worker may call it.)
SECURITY DEFINER
AS $$
BEGIN
    WITH due AS (
             SELECT r.id FROM llmbatching.requests r
               JOIN llmbatching.batches b ON b.id = r.batch_id
              WHERE b.state = 'done' AND b.finished_at < cutoff
                AND r.state IN ('completed', 'failed', 'cancelled') AND r.finished_at < cutoff
             UNION ALL
             SELECT r.id FROM llmbatching.requests r
              WHERE r.batch_id IS NULL AND r.state IN ('completed', 'failed', 'cancelled')
                AND r.finished_at < cutoff),
         -- (Not one whose answer still waits to be written into its row: it goes once written.)
         unheld AS (
             SELECT r.id FROM llmbatching.requests r
              WHERE r.id IN (SELECT d.id FROM due d)
                AND NOT EXISTS (SELECT FROM llmbatching.writebacks w
                                 WHERE w.request_id = r.id AND w.written_at IS NULL)
                FOR UPDATE SKIP LOCKED),
         written AS (
             SELECT w.request_id FROM llmbatching.writebacks w
              WHERE w.request_id IN (SELECT u.id FROM unheld u)),
         written_unheld AS (
             SELECT w.request_id FROM llmbatching.writebacks w
              WHERE w.request_id IN (SELECT u.id FROM unheld u)
                FOR UPDATE SKIP LOCKED),
         gone AS (
             DELETE FROM llmbatching.requests r
              WHERE r.id IN (SELECT u.id FROM unheld u)
                AND r.id NOT IN (SELECT x.request_id FROM written x
                                 EXCEPT ALL
                                 SELECT y.request_id FROM written_unheld y)
             RETURNING 1)
    SELECT count(*) INTO requests FROM gone;
    WITH gone AS (DELETE FROM llmbatching.batches b
                   WHERE b.state = 'done' AND b.finished_at < cutoff
                     AND NOT EXISTS (SELECT FROM llmbatching.requests r WHERE r.batch_id = b.id)
                  RETURNING 1)
    SELECT count(*) INTO batches FROM gone;
END
$$;
ALTER FUNCTION llmbatching.purge_before(timestamptz) SET search_path = pg_catalog, pg_temp;
-- A purge leaves a write-back its role keeps locked (see pipelines.sql).
CREATE OR REPLACE FUNCTION llmbatching.requests_deleted() RETURNS trigger
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
ALTER FUNCTION llmbatching.requests_deleted() SET search_path = pg_catalog, pg_temp;
-- Giving up a batch's results counts only what would be sent again (see copies.sql).
CREATE OR REPLACE FUNCTION llmbatching.llm_give_up_results(batch bigint, confirm boolean DEFAULT false)
RETURNS TABLE (requests_sent_again bigint, estimated_input_tokens bigint, estimated_cost numeric, given_up boolean)
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    b llmbatching.batches;
BEGIN
    SELECT * INTO b FROM llmbatching.batches x WHERE x.id = llm_give_up_results.batch;
    IF NOT FOUND OR b.state <> 'ingesting' THEN
        RAISE EXCEPTION 'invalid argument "batch": % is not a batch whose results are being read', llm_give_up_results.batch
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'SELECT id, last_error FROM llmbatching.batches WHERE state = ''ingesting'' lists them.';
    END IF;
    SELECT count(*), coalesce(sum((r.body_bytes + 3) / 4), 0),
           round(coalesce(sum((r.body_bytes + 3) / 4 * p.batch_input), 0) / 1000000, 6)
      INTO requests_sent_again, estimated_input_tokens, estimated_cost
      FROM llmbatching.requests r
      LEFT JOIN LATERAL llmbatching.price_of(r.provider, r.model) p ON true
     WHERE r.batch_id = b.id AND r.state = 'submitted'
       -- (Not those whose answer is kept while their role holds them: it is applied later.)
       AND NOT EXISTS (SELECT FROM llmbatching.held_answers h WHERE h.request_id = r.id AND h.batch_id = b.id);
    given_up := confirm;
    IF confirm THEN
        UPDATE llmbatching.batches x SET results_given_up_at = now(), next_check_at = now() WHERE x.id = b.id;
        PERFORM llmbatching.wake_worker();
    END IF;
    RETURN NEXT;
END
$$;
ALTER FUNCTION llmbatching.llm_give_up_results(bigint, boolean) SET search_path = pg_catalog, pg_temp;
