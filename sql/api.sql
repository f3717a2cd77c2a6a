-- The read side of the SQL API. llm_submit and llm_submit_body are defined in Rust.

CREATE FUNCTION llm_status(id bigint) RETURNS text
LANGUAGE sql STABLE STRICT
AS $$ SELECT r.state FROM llmbatching.requests r WHERE r.id = llm_status.id $$;
COMMENT ON FUNCTION llm_status(bigint) IS 'queued, submitted, completed, failed or cancelled; NULL for an unknown id';

CREATE FUNCTION llm_result(id bigint) RETURNS text
LANGUAGE sql STABLE STRICT
AS $$ SELECT r.result_text FROM llmbatching.requests r WHERE r.id = llm_result.id AND r.state = 'completed' $$;
COMMENT ON FUNCTION llm_result(bigint) IS 'The answer text of a completed request; NULL until then';

CREATE FUNCTION llm_result_json(id bigint) RETURNS jsonb
LANGUAGE sql STABLE STRICT
AS $$ SELECT r.response FROM llmbatching.requests r WHERE r.id = llm_result_json.id AND r.state = 'completed' $$;
COMMENT ON FUNCTION llm_result_json(bigint) IS 'The whole response body of a completed request; NULL until then';

CREATE FUNCTION llm_error(id bigint) RETURNS text
LANGUAGE sql STABLE STRICT
AS $$ SELECT r.error FROM llmbatching.requests r WHERE r.id = llm_error.id AND r.state = 'failed' $$;
COMMENT ON FUNCTION llm_error(bigint) IS 'Why a request failed; NULL unless it failed';

CREATE FUNCTION llm_channel() RETURNS text
LANGUAGE sql STABLE
AS $$ SELECT 'llmbatching_' || r.oid FROM pg_roles r WHERE r.rolname = current_user $$;
COMMENT ON FUNCTION llm_channel() IS
    'The channel to LISTEN on: notified, with no payload, when requests of the current role finish';
