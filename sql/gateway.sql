-- The OpenAI-compatible gateway (gateway/, llmbatching-gateway) serves HTTP clients from this
-- database. Each of its keys belongs to a role, and every call runs as that role (SET LOCAL ROLE
-- in the call's transaction), so row-level security, quotas and costs work per key as they do
-- for SQL users. Only a key's sha256 is kept; the secret is shown once, when it is created.
--
-- The gateway logs in as a role that is a member of llmbatching_gateway. That role (NOINHERIT:
-- it holds no privilege of the roles it may become) is granted each key's role when a key is
-- created, and it may call only llmbatching.gateway_key_role, to learn which role a key is.

CREATE TABLE llmbatching.gateway_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    role        name NOT NULL,
    -- The secret's first characters, to tell keys apart in listings.
    prefix      text NOT NULL,
    hash        bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by  name NOT NULL DEFAULT CURRENT_USER,
    revoked_at  timestamptz
);
COMMENT ON TABLE llmbatching.gateway_keys IS 'Keys of the gateway: the role each runs as; only a hash of each secret';

-- Calls made with an Idempotency-Key header: the request each key of a role named.
CREATE TABLE llmbatching.gateway_calls (
    submitted_by    name NOT NULL DEFAULT CURRENT_USER,
    idempotency_key text NOT NULL CHECK (pg_catalog.length(idempotency_key) BETWEEN 1 AND 255),
    request_id      bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (submitted_by, idempotency_key)
);
COMMENT ON TABLE llmbatching.gateway_calls IS 'Idempotency keys of gateway calls, per role';
SELECT pg_catalog.pg_extension_config_dump('llmbatching.gateway_keys', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.gateway_calls', '');

-- Creates a key for `role` and returns its secret, which is not kept and cannot be shown again.
-- The role must be a member of llmbatching_user, and may not be a superuser or hold any power
-- beyond an ordinary role's: the gateway can become it.
CREATE FUNCTION llm_gateway_key_create(role name) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    r      pg_catalog.pg_roles;
    secret text;
BEGIN
    SELECT * INTO r FROM pg_catalog.pg_roles x WHERE x.rolname OPERATOR(pg_catalog.=) llm_gateway_key_create.role;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'invalid argument "role": role "%" does not exist', llm_gateway_key_create.role
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls
       OR pg_catalog.pg_has_role(r.oid, 'llmbatching_admin', 'MEMBER') THEN
        RAISE EXCEPTION 'invalid argument "role": a gateway key may not be for role "%": it is a superuser, an administrator or holds CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS', r.rolname
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Create an ordinary role for the gateway''s callers and grant it llmbatching_user.';
    END IF;
    IF NOT pg_catalog.pg_has_role(r.oid, 'llmbatching_user', 'MEMBER') THEN
        RAISE EXCEPTION 'invalid argument "role": role "%" is not a member of llmbatching_user', r.rolname
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = pg_catalog.format('GRANT llmbatching_user TO %I;', r.rolname);
    END IF;
    secret := 'lbk_' OPERATOR(pg_catalog.||) pg_catalog.replace(pg_catalog.gen_random_uuid()::pg_catalog.text, '-', '')
              OPERATOR(pg_catalog.||) pg_catalog.replace(pg_catalog.gen_random_uuid()::pg_catalog.text, '-', '');
    INSERT INTO llmbatching.gateway_keys (role, prefix, hash, created_by)
    VALUES (r.rolname, pg_catalog.substr(secret, 1, 12), pg_catalog.sha256(pg_catalog.convert_to(secret, 'UTF8')), SESSION_USER);
    IF NOT pg_catalog.pg_has_role('llmbatching_gateway', r.oid, 'MEMBER') THEN
        EXECUTE pg_catalog.format('GRANT %I TO llmbatching_gateway', r.rolname);
    END IF;
    RETURN secret;
END
$$;
COMMENT ON FUNCTION llm_gateway_key_create(name) IS 'Creates a gateway key for a role; returns the secret once (only its hash is kept)';

-- The gateway's keys, without their secrets.
CREATE FUNCTION llm_gateway_keys()
RETURNS TABLE (id bigint, role name, prefix text, created_at timestamptz, created_by name, revoked_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER
AS $$
    SELECT k.id, k.role, k.prefix, k.created_at, k.created_by, k.revoked_at
      FROM llmbatching.gateway_keys k ORDER BY k.id
$$;

-- Revokes a key: calls with it are refused from now on (401). The gateway stops being able to
-- become the role once the role has no key left.
CREATE FUNCTION llm_gateway_key_revoke(id bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
AS $$
DECLARE
    revoked_role name;
BEGIN
    UPDATE llmbatching.gateway_keys k SET revoked_at = pg_catalog.now()
     WHERE k.id OPERATOR(pg_catalog.=) llm_gateway_key_revoke.id AND k.revoked_at IS NULL
    RETURNING k.role INTO revoked_role;
    IF revoked_role IS NULL THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT FROM llmbatching.gateway_keys k
                    WHERE k.role OPERATOR(pg_catalog.=) revoked_role AND k.revoked_at IS NULL)
       AND EXISTS (SELECT FROM pg_catalog.pg_roles x WHERE x.rolname OPERATOR(pg_catalog.=) revoked_role) THEN
        EXECUTE pg_catalog.format('REVOKE %I FROM llmbatching_gateway', revoked_role);
    END IF;
    RETURN true;
END
$$;

-- The role of a gateway key, or NULL for a wrong or revoked key (or a role that may no longer
-- submit). For the gateway's login only.
CREATE FUNCTION llmbatching.gateway_key_role(secret text) RETURNS name
LANGUAGE sql STABLE SECURITY DEFINER
AS $$
    SELECT k.role FROM llmbatching.gateway_keys k
      JOIN pg_catalog.pg_roles r ON r.rolname OPERATOR(pg_catalog.=) k.role
     WHERE k.hash OPERATOR(pg_catalog.=) pg_catalog.sha256(pg_catalog.convert_to(secret, 'UTF8'))
       AND k.revoked_at IS NULL
       AND pg_catalog.pg_has_role(r.oid, 'llmbatching_user', 'MEMBER')
       AND NOT r.rolsuper
$$;

-- One gateway call, as the key's role: the request a call names (its Idempotency-Key, else the
-- newest request of the role with the same provider, endpoint and body that was not
-- cancelled), or a new one, queued as llm_submit_body queues it. Concurrent identical calls wait
-- for each other, so they name one request.
CREATE FUNCTION llmbatching.gateway_request(provider text, endpoint text, body jsonb, idempotency_key text,
                                            OUT id bigint, OUT state text, OUT response jsonb, OUT error text,
                                            OUT created boolean)
LANGUAGE plpgsql
AS $$
DECLARE
    chosen text := coalesce(provider, pg_catalog.current_setting('llmbatching.default_provider', true), 'openai');
    hash   bytea := pg_catalog.sha256(pg_catalog.convert_to(chosen OPERATOR(pg_catalog.||) ' '
                      OPERATOR(pg_catalog.||) endpoint OPERATOR(pg_catalog.||) ' ' OPERATOR(pg_catalog.||) body::pg_catalog.text, 'UTF8'));
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext(CURRENT_USER::pg_catalog.text
        OPERATOR(pg_catalog.||) coalesce(idempotency_key, pg_catalog.encode(hash, 'hex'))));
    created := false;
    IF idempotency_key IS NOT NULL THEN
        SELECT c.request_id INTO id FROM llmbatching.gateway_calls c
         WHERE c.submitted_by OPERATOR(pg_catalog.=) CURRENT_USER
           AND c.idempotency_key OPERATOR(pg_catalog.=) gateway_request.idempotency_key;
    ELSE
        SELECT r.id INTO id FROM llmbatching.requests r
         WHERE r.request_hash OPERATOR(pg_catalog.=) hash
           AND r.submitted_by OPERATOR(pg_catalog.=) CURRENT_USER
           AND r.state OPERATOR(pg_catalog.<>) 'cancelled'
         ORDER BY r.id DESC LIMIT 1;
    END IF;
    IF id IS NULL THEN
        id := llmbatching.llm_submit_body(body, endpoint, provider => chosen);
        created := true;
        IF idempotency_key IS NOT NULL THEN
            INSERT INTO llmbatching.gateway_calls (idempotency_key, request_id)
            VALUES (gateway_request.idempotency_key, id);
        END IF;
    END IF;
    SELECT r.state, r.response, r.error INTO state, response, error
      FROM llmbatching.requests r WHERE r.id OPERATOR(pg_catalog.=) gateway_request.id;
END
$$;

-- A request's state and answer, for a gateway call waiting on it.
CREATE FUNCTION llmbatching.gateway_answer(id bigint, OUT state text, OUT response jsonb, OUT error text)
LANGUAGE sql STABLE
AS $$
    SELECT r.state, r.response, r.error FROM llmbatching.requests r WHERE r.id OPERATOR(pg_catalog.=) gateway_answer.id
$$;

ALTER TABLE llmbatching.gateway_calls ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_calls ON llmbatching.gateway_calls
    USING (submitted_by OPERATOR(pg_catalog.=) CURRENT_USER)
    WITH CHECK (submitted_by OPERATOR(pg_catalog.=) CURRENT_USER);
