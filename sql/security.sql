-- This installation's identity, where it lives now.
INSERT INTO llmbatching.instance (home) VALUES (llmbatching.current_home());

-- Who may do what. PUBLIC gets nothing. Members of llmbatching_user submit requests and read
-- their own; members of llmbatching_admin read and cancel everyone's, purge, and set limits.
-- The worker runs as a superuser and is not bound by row-level security.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'llmbatching_user') THEN
        CREATE ROLE llmbatching_user NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'llmbatching_admin') THEN
        CREATE ROLE llmbatching_admin NOLOGIN;
    END IF;
    -- The gateway's login is a member: it may become the role of a gateway key (each key's role
    -- is granted to it), and holds none of their privileges meanwhile (NOINHERIT).
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'llmbatching_gateway') THEN
        CREATE ROLE llmbatching_gateway NOLOGIN NOINHERIT;
    END IF;
END
$$;
GRANT llmbatching_user TO llmbatching_admin;

-- Rows inserted directly are checked as llm_submit_body checks them, so no role can queue a
-- request that would make a shared batch fail.
CREATE FUNCTION llmbatching.check_request() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text;
BEGIN
    -- Restored from a dump: kept as it was (a restored row carries its original created_at; a
    -- submission cannot set it).
    IF NEW.created_at <> now() THEN
        RETURN NEW;
    END IF;
    -- Whose key pays is the trigger's choice, never the inserting role's.
    NEW.account := llmbatching.request_account(NEW.provider, NEW.endpoint);
    IF llmbatching.insert_is_checked() THEN
        RETURN NEW;
    END IF;
    problem := llmbatching.request_problem(NEW.endpoint, NEW.model, NEW.body, NEW.answer_format, NEW.job);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '%', problem USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER check_request BEFORE INSERT ON llmbatching.requests
    FOR EACH ROW EXECUTE FUNCTION llmbatching.check_request();

-- Deletes requests that finished before `cutoff` and done batches left without requests;
-- returns how many of each went. A request that a batch carried goes with its batch, once the
-- batch is done before the cutoff (it is done once every request it carried has finished, or
-- has its answer kept aside): these are found through the batches, so the index of finished
-- requests need only hold the few that finished without a batch, and a batch's answers
-- arriving never add to it. A request whose answer still waits to be written into its row is
-- left until it is. So is one its role keeps locked, or whose write-back (which goes with it)
-- its role keeps locked: waiting for it would hold up the purge of every other role's rows.
CREATE FUNCTION llmbatching.purge_before(cutoff timestamptz, OUT requests bigint, OUT batches bigint)
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

-- Deletes finished requests older than `older_than` (and batches left without requests).
CREATE FUNCTION llm_purge(older_than interval) RETURNS bigint
LANGUAGE sql STRICT
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT requests FROM llmbatching.purge_before(now() - older_than)
$$;
COMMENT ON FUNCTION llm_purge(interval) IS 'Deletes finished requests older than the interval; for llmbatching_admin';

-- Functions: nothing for PUBLIC; the user functions for llmbatching_user. Every function
-- resolves names from pg_catalog alone, so no same-named object elsewhere can stand in for what
-- it calls, except llm_classify, which evaluates the caller's own prompt and filter expressions
-- with the caller's search_path and privileges (and qualifies everything it calls itself), and
-- the llm_submit functions: they are written in Rust, name every object they use with its
-- schema, and are called once per row, where a pinned search_path would cost a setting's save
-- and restore per call. (This block runs while the extension is created, with the path set to
-- the extension's own new schema; it qualifies what it calls all the same.)
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT d.objid::pg_catalog.regprocedure AS signature, p.proname
               FROM pg_catalog.pg_depend d
               JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
               JOIN pg_catalog.pg_proc p ON p.oid = d.objid
              WHERE e.extname OPERATOR(pg_catalog.=) 'llmbatching'
                AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
                AND d.deptype OPERATOR(pg_catalog.=) 'e'
                AND p.pronamespace OPERATOR(pg_catalog.=) 'llmbatching'::pg_catalog.regnamespace
    LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.signature::pg_catalog.text);
        IF f.proname OPERATOR(pg_catalog.<>) ALL (ARRAY['llm_classify', 'price_of']::pg_catalog.name[])
           AND f.proname::pg_catalog.text NOT LIKE 'llm\_submit%' THEN
            EXECUTE pg_catalog.format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp', f.signature::pg_catalog.text);
        END IF;
        IF f.proname OPERATOR(pg_catalog.=) ANY (ARRAY['llm_purge', 'purge_before', 'llm_adopt', 'llm_give_up_results',
                                                       'llm_gateway_key_create', 'llm_gateway_keys',
                                                       'llm_gateway_key_revoke', 'llm_worker_status',
                                                       'llm_worker_restart', 'llm_worker_start']::pg_catalog.name[]) THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO llmbatching_admin', f.signature::pg_catalog.text);
        ELSIF f.proname::pg_catalog.text LIKE 'llm\_%'
              OR f.proname OPERATOR(pg_catalog.=) ANY (ARRAY['check_target', 'primary_key_columns', 'request_problem', 'request_account',
                                                            'insert_is_checked', 'is_deterministic', 'worker_problem', 'price_of',
                                                            'gateway_request', 'gateway_answer',
                                                            'copy_problem', 'current_home']::pg_catalog.name[]) THEN
            EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO llmbatching_user', f.signature::pg_catalog.text);
        END IF;
    END LOOP;
END
$$;

GRANT EXECUTE ON FUNCTION llmbatching.gateway_key_role(text) TO llmbatching_gateway;

REVOKE ALL ON SCHEMA llmbatching FROM PUBLIC;
GRANT USAGE ON SCHEMA llmbatching TO llmbatching_gateway;
-- Gateway keys are read and written only through the functions above; a role's idempotency
-- keys are its own (row-level security).
REVOKE ALL ON llmbatching.gateway_keys, llmbatching.gateway_calls FROM PUBLIC;
GRANT SELECT, INSERT (idempotency_key, request_id) ON llmbatching.gateway_calls TO llmbatching_user;
REVOKE ALL ON ALL TABLES IN SCHEMA llmbatching FROM PUBLIC;
GRANT USAGE ON SCHEMA llmbatching TO llmbatching_user;

-- Requests: users insert the request columns only (the rest takes its defaults, and the check
-- above applies), read their own rows, and may only move their own unfinished requests to
-- 'cancelled'.
GRANT SELECT ON llmbatching.requests TO llmbatching_user;
GRANT INSERT (provider, endpoint, model, body, job, answer_format, reuse) ON llmbatching.requests TO llmbatching_user;
-- Providers: every user may use the server openai; an administrator may create servers and
-- grant their use (GRANT USAGE ON FOREIGN SERVER ... TO ...).
GRANT USAGE ON FOREIGN SERVER openai TO llmbatching_user;
GRANT USAGE ON FOREIGN DATA WRAPPER llmbatching TO llmbatching_admin;
GRANT UPDATE (state, finished_at) ON llmbatching.requests TO llmbatching_user;
GRANT DELETE ON llmbatching.requests TO llmbatching_admin;
ALTER TABLE llmbatching.requests ENABLE ROW LEVEL SECURITY;
CREATE POLICY read_own ON llmbatching.requests FOR SELECT
    USING (submitted_by = current_user OR pg_has_role(current_user, 'llmbatching_admin', 'MEMBER'));
-- A new row is queued, or completed at once by reusing an identical answer (only the
-- dedupe trigger can set reused_from).
CREATE POLICY submit_own ON llmbatching.requests FOR INSERT
    WITH CHECK (submitted_by = current_user AND (state = 'queued' OR (state = 'completed' AND reused_from IS NOT NULL)));
CREATE POLICY cancel_own ON llmbatching.requests FOR UPDATE
    USING ((submitted_by = current_user OR pg_has_role(current_user, 'llmbatching_admin', 'MEMBER'))
           AND state IN ('queued', 'submitted'))
    WITH CHECK (state = 'cancelled');
CREATE POLICY purge ON llmbatching.requests FOR DELETE
    USING (pg_has_role(current_user, 'llmbatching_admin', 'MEMBER'));

-- Write-backs: registered for one's own requests, into columns one may update oneself.
GRANT SELECT ON llmbatching.writebacks TO llmbatching_user;
GRANT INSERT (request_id, target, target_column, row_key) ON llmbatching.writebacks TO llmbatching_user;
GRANT UPDATE (target, target_column, row_key, written_at, outcome) ON llmbatching.writebacks TO llmbatching_user;
ALTER TABLE llmbatching.writebacks ENABLE ROW LEVEL SECURITY;
CREATE POLICY read_own ON llmbatching.writebacks FOR SELECT
    USING (submitted_by = current_user OR pg_has_role(current_user, 'llmbatching_admin', 'MEMBER'));
CREATE POLICY register_own ON llmbatching.writebacks FOR INSERT
    WITH CHECK (submitted_by = current_user
                AND EXISTS (SELECT FROM llmbatching.requests r WHERE r.id = request_id AND r.submitted_by = current_user)
                AND has_column_privilege(target, target_column::text, 'UPDATE'));
CREATE POLICY update_own ON llmbatching.writebacks FOR UPDATE
    USING (submitted_by = current_user)
    WITH CHECK (submitted_by = current_user AND has_column_privilege(target, target_column::text, 'UPDATE'));

-- Batches mix the requests of several roles: only administrators read them whole. A role sees
-- each batch as far as its own requests go, through my_batches.
GRANT SELECT, DELETE ON llmbatching.batches TO llmbatching_admin;
GRANT SELECT ON llmbatching.my_batches TO llmbatching_user;
REVOKE ALL ON llmbatching.writeback_queue FROM PUBLIC;

-- Jobs are computed with the reader's privileges, so each role sees its own requests in them.
ALTER VIEW llmbatching.jobs SET (security_invoker = true);
GRANT SELECT ON llmbatching.jobs TO llmbatching_user;

-- Limits, pauses and prices: everyone reads them; admins set them.
GRANT SELECT ON llmbatching.model_limits, llmbatching.model_pauses, llmbatching.prices TO llmbatching_user;
GRANT INSERT, UPDATE, DELETE ON llmbatching.model_limits, llmbatching.model_pauses, llmbatching.prices
    TO llmbatching_admin;

-- Costs are computed with the reader's privileges: each role sees its own.
ALTER VIEW llmbatching.request_costs SET (security_invoker = true);
ALTER VIEW llmbatching.cost_totals SET (security_invoker = true);
ALTER VIEW llmbatching.cost_by_job SET (security_invoker = true);
ALTER VIEW llmbatching.cost_by_model SET (security_invoker = true);
ALTER VIEW llmbatching.cost_by_day SET (security_invoker = true);
GRANT SELECT ON llmbatching.request_costs, llmbatching.cost_totals, llmbatching.cost_by_job, llmbatching.cost_by_model, llmbatching.cost_by_day
    TO llmbatching_user;

-- This database's worker: started now unless the launcher serves this database (or one runs).
SELECT llmbatching.start_worker_if_needed();
