-- Backups, moves and copies. Every table is dumped by pg_dump (see schema.sql), so a restored or
-- cloned database holds every request and answer, and the installation's identity, whose `home`
-- says where the original lives. A database whose home is not its own is a copy: its worker
-- sends nothing, and deletes nothing, at the provider (the original may still be collecting that
-- very work) until an administrator adopts it.

-- Why this database's worker sends nothing, if it is a copy; NULL in the original.
CREATE FUNCTION llmbatching.copy_problem() RETURNS text
LANGUAGE plpgsql STABLE
SECURITY DEFINER
AS $$
BEGIN
    IF (SELECT i.home FROM llmbatching.instance i) IS NOT DISTINCT FROM llmbatching.current_home() THEN
        RETURN NULL;
    END IF;
    RETURN 'this database is a copy of the one llmbatching was installed in (restored from a dump, or cloned), '
        || 'so its worker sends nothing to the provider and requests stay queued. An administrator runs '
        || 'SELECT llmbatching.llm_adopt() to take over the work after a move (the original stopped), or '
        || 'SELECT llmbatching.llm_adopt(as_copy => true) to make it a copy of its own (the work it inherited stays with the original)';
END
$$;

-- Ends copy mode. After a move (the original is gone), this database takes over the
-- installation's identity: it collects the batches in flight from the provider (they are found by
-- their ids and tags, never sent again) and sends what is queued. With as_copy, it becomes an
-- installation of its own, with a new identity: the unfinished requests it inherited are
-- cancelled here ('left with the original'), its open batches closed without a call to the
-- provider, and what is submitted from now on is sent under the new identity.
CREATE FUNCTION llm_adopt(as_copy boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql
SECURITY DEFINER
AS $$
DECLARE
    inherited_until timestamptz;
BEGIN
    IF llmbatching.copy_problem() IS NULL THEN
        RAISE NOTICE 'llm_adopt: this database is the original; nothing to adopt';
        RETURN;
    END IF;
    IF as_copy THEN
        SELECT coalesce(i.copied_at, now()) INTO inherited_until FROM llmbatching.instance i;
        -- What was in flight belongs to the original's batches; what was queued before the copy
        -- was made is the original's to send.
        UPDATE llmbatching.requests r
           SET state = 'cancelled', finished_at = now(),
               error = 'left with the database this one was copied from'
         WHERE r.state = 'submitted' OR (r.state = 'queued' AND r.created_at < inherited_until);
        UPDATE llmbatching.batches b
           SET state = 'done', finished_at = now(),
               last_error = 'left with the database this one was copied from'
         WHERE b.state <> 'done';
        UPDATE llmbatching.instance
           SET id = gen_random_uuid()::text, home = llmbatching.current_home(), adopted_at = now(), copied_at = NULL;
    ELSE
        UPDATE llmbatching.instance
           SET home = llmbatching.current_home(), adopted_at = now(), copied_at = NULL;
    END IF;
    PERFORM llmbatching.wake_worker();
END
$$;
COMMENT ON FUNCTION llm_adopt(boolean) IS
    'Ends copy mode: take over the work after a move, or (as_copy) become an installation of its own';

-- An ended batch whose result files cannot be read whole is read again, with backoff, for
-- llmbatching.result_retry_window (a day): sending its requests again would pay twice for answers
-- the provider may have. An administrator can give up on them sooner: first without confirm,
-- to see what it would cost, then with confirm => true.
CREATE FUNCTION llm_give_up_results(batch bigint, confirm boolean DEFAULT false)
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
COMMENT ON FUNCTION llm_give_up_results(bigint, boolean) IS
    'Stops waiting for a batch''s result files: what they did not settle is sent again (shows the cost first; confirm => true to do it)';
