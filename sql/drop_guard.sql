-- Dropping the extension while batches are open at the provider would leave them running and
-- billed, with their answers collected by no one: DROP EXTENSION refuses, and says how to
-- cancel them first (or how to drop anyway). So does DROP SCHEMA llmbatching CASCADE, which
-- drops the extension with its schema.
CREATE FUNCTION llmbatching.drop_guard() RETURNS event_trigger
LANGUAGE plpgsql
AS $$
DECLARE
    open_batches bigint;
BEGIN
    -- The trigger fires for every DROP EXTENSION and DROP SCHEMA; only a statement naming this
    -- one matters.
    IF current_query() !~* '\mllmbatching\M' THEN
        RETURN;
    END IF;
    -- A copy's batches are the original's: it may go.
    IF llmbatching.copy_problem() IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT count(*) INTO open_batches FROM llmbatching.batches b WHERE b.state <> 'done';
    IF open_batches > 0 THEN
        RAISE EXCEPTION 'llmbatching has % batches open at the provider; dropping it now would leave them running and billed, their answers collected by no one', open_batches
            USING ERRCODE = 'object_in_use',
                  HINT = 'Cancel them first: SELECT llmbatching.llm_cancel(id) FROM llmbatching.requests WHERE state IN (''queued'', ''submitted''); then wait until SELECT count(*) FROM llmbatching.batches WHERE state <> ''done'' is 0. To drop anyway: ALTER EVENT TRIGGER llmbatching_drop_guard DISABLE;';
    END IF;
END
$$;

CREATE EVENT TRIGGER llmbatching_drop_guard ON ddl_command_start
    WHEN TAG IN ('DROP EXTENSION', 'DROP SCHEMA')
    EXECUTE FUNCTION llmbatching.drop_guard();
