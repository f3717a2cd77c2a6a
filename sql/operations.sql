-- The workers, for administrators: which run, where, doing what (see also llm_worker_start,
-- in Rust). A worker serves one database; the launcher starts one for each database with the
-- extension (that llmbatching.database names, if set); without preloading, CREATE EXTENSION
-- or llm_worker_start() starts it.
CREATE FUNCTION llm_worker_status()
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
COMMENT ON FUNCTION llm_worker_status() IS 'The llmbatching workers of the cluster: pid, database, what each is doing; batches in flight and the last error for this database';

-- Restarts this database's worker: stops it (waiting up to 10 seconds); when this transaction
-- commits, the launcher starts it again, or, where the launcher does not serve this database,
-- a dynamic background worker starts. True if one was running.
CREATE FUNCTION llm_worker_restart() RETURNS boolean
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
COMMENT ON FUNCTION llm_worker_restart() IS 'Restarts this database''s llmbatching worker';
