-- llmbatching state: every request and every batch, in schema llmbatching.
-- The background worker moves rows through these tables; users read them directly.

-- The schema is named in the control file: CREATE EXTENSION creates it, and everything of the
-- extension lives in it, never in a schema others may create objects in (whatever they plant
-- there would run as whoever calls an extension function). A schema of that name made by
-- anyone but a superuser beforehand is refused: its owner could plant objects in it.
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_namespace n
                 JOIN pg_catalog.pg_roles o ON o.oid OPERATOR(pg_catalog.=) n.nspowner
                WHERE n.nspname OPERATOR(pg_catalog.=) 'llmbatching' AND NOT o.rolsuper) THEN
        RAISE EXCEPTION 'schema llmbatching already exists and belongs to a role that is not a superuser'
            USING HINT = 'Drop it, or make a superuser its owner after checking what it holds, then create the extension.';
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.relnamespace OPERATOR(pg_catalog.=) 'llmbatching'::pg_catalog.regnamespace)
       OR EXISTS (SELECT FROM pg_catalog.pg_proc p WHERE p.pronamespace OPERATOR(pg_catalog.=) 'llmbatching'::pg_catalog.regnamespace) THEN
        RAISE EXCEPTION 'schema llmbatching already holds objects; llmbatching needs a schema of its own';
    END IF;
END
$$;
COMMENT ON SCHEMA llmbatching IS 'State of llmbatching: queued and answered LLM requests and the provider batches that carry them';

-- One row: this installation's identity, written into every batch's metadata so that batches
-- created just before a crash can be recognised at the provider afterwards, and where it lives
-- (`home`: the cluster's system identifier and the database's oid; see llmbatching.current_home).
-- A database restored from a dump, or cloned, carries the row but lives elsewhere: it is a copy,
-- and its worker sends nothing until an administrator runs llm_adopt. (The row is inserted by
-- the install script once current_home exists.)
CREATE TABLE llmbatching.instance (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    id          text NOT NULL DEFAULT pg_catalog.gen_random_uuid()::text,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    home        text NOT NULL,
    -- When this database was found to be a copy (restored, or first seen by its worker), and
    -- when an administrator last adopted it.
    copied_at   timestamptz,
    adopted_at  timestamptz
);

-- A restore loads the original's row over the one CREATE EXTENSION made (and an
-- administrator's price rows over the shipped ones): an insert of a key already there replaces
-- that row, so a restore never fails on, or duplicates, what the extension ships.
CREATE FUNCTION llmbatching.instance_restored() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF EXISTS (SELECT FROM llmbatching.instance) THEN
        UPDATE llmbatching.instance
           SET id = NEW.id, created_at = NEW.created_at, home = NEW.home,
               copied_at = CASE WHEN NEW.home IS DISTINCT FROM llmbatching.current_home()
                                THEN pg_catalog.now() END,
               adopted_at = NEW.adopted_at;
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER instance_restored BEFORE INSERT ON llmbatching.instance
    FOR EACH ROW EXECUTE FUNCTION llmbatching.instance_restored();

-- A batch's own life cycle (state), beside the provider's status (provider_status):
--   pending    requests assigned; input file not yet uploaded
--   uploaded   input file at the provider; batch not yet created there
--   submitted  batch created at the provider; polled until it ends
--   ingesting  ended at the provider; output and error files being read back
--   done       every request of the batch is answered, failed or queued again
CREATE TABLE llmbatching.batches (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The provider (a server of the llmbatching wrapper) and whose key it goes under (as in
    -- requests): a batch carries requests of one of each.
    provider            text NOT NULL DEFAULT 'openai',
    account             text NOT NULL DEFAULT '',
    endpoint            text NOT NULL,
    model               text NOT NULL,
    state               text NOT NULL DEFAULT 'pending'
                        CHECK (state IN ('pending', 'uploaded', 'submitted', 'ingesting', 'done')),
    provider_status     text,
    request_count       integer NOT NULL,
    -- How many of its requests asked for an answer format (a JSON schema or labels) to check.
    answer_formats      integer NOT NULL DEFAULT 0,
    -- Prompt tokens estimated before sending, counted against the model's enqueued-token cap.
    estimated_tokens    bigint NOT NULL DEFAULT 0,
    input_bytes         bigint,
    input_file_id       text,
    provider_batch_id   text,
    -- Where the provider keeps the results: file ids, or (Anthropic) the results_url.
    output_file_id      text,
    error_file_id       text,
    -- The provider's request counts (a request that did not run because the batch was
    -- cancelled counts as failed there), and how many of its requests were cancelled here.
    completed_count     integer NOT NULL DEFAULT 0,
    failed_count        integer NOT NULL DEFAULT 0,
    cancelled_count     integer NOT NULL DEFAULT 0,
    input_tokens        bigint,
    cached_tokens       bigint,
    output_tokens       bigint,
    reasoning_tokens    bigint,
    provider_errors     text,
    last_error          text,
    step_failures       integer NOT NULL DEFAULT 0,
    next_check_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    create_attempted_at timestamptz,
    submitted_at        timestamptz,
    ended_at            timestamptz,
    finished_at         timestamptz,
    -- Every request of the batch was cancelled: cancel it at the provider.
    cancel_requested_at timestamptz,
    cancel_sent_at      timestamptz,
    files_deleted_at    timestamptz,
    -- The roles whose requests it carries, for the cap on each role's batches in flight.
    roles               name[] NOT NULL DEFAULT '{}',
    -- An administrator gave up waiting for its result files (llm_give_up_results): what they
    -- did not settle is queued again at the next reading.
    results_given_up_at timestamptz
);
COMMENT ON TABLE llmbatching.batches IS 'Provider batches: state is llmbatching''s own step, provider_status the provider''s';
CREATE INDEX batches_open ON llmbatching.batches (next_check_at) WHERE state <> 'done';
CREATE UNIQUE INDEX batches_provider_batch ON llmbatching.batches (provider, provider_batch_id);
CREATE INDEX batches_finished ON llmbatching.batches (finished_at) WHERE state = 'done';

CREATE TABLE llmbatching.requests (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    state           text NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'submitted', 'completed', 'failed', 'cancelled')),
    -- The provider: a foreign server of the llmbatching wrapper (see sql/providers.sql).
    provider        text NOT NULL DEFAULT 'openai',
    -- Whose key pays, chosen when the request is queued: the submitting role, when it has a user
    -- mapping of its own for the provider, else '' (the mapping FOR PUBLIC, or for the server
    -- openai the server-wide key). Set by the insert trigger; no role picks it.
    account         text NOT NULL DEFAULT '',
    endpoint        text NOT NULL,
    model           text NOT NULL,
    body            jsonb NOT NULL,
    -- Size of the body as it is written into the batch file.
    body_bytes      integer NOT NULL GENERATED ALWAYS AS (pg_catalog.octet_length(body::pg_catalog.text)) STORED,
    -- The batch carrying the request; set only by the worker. Not a foreign key: checking one
    -- would cost a query per request each time a batch is claimed.
    batch_id        bigint,
    attempts        integer NOT NULL DEFAULT 0,
    response        jsonb,
    result_text     text,
    -- The answer as JSON, for requests that asked for a structured answer.
    result_json     jsonb,
    -- What the answer must be: {"type": "json"} or {"type": "label", "labels": [...]}.
    answer_format   jsonb,
    job             text,
    error           text,
    input_tokens    integer,
    cached_tokens   integer,
    output_tokens   integer,
    reasoning_tokens integer,
    -- sha256 of the provider, the endpoint and the canonical (jsonb) body: identical requests share it.
    request_hash    bytea,
    -- Whether an earlier identical answer may be reused: NULL follows llmbatching.reuse_answers.
    reuse           boolean,
    -- The identical request whose answer this one gets (waiting on it while it is in flight,
    -- or reused from it when it had already completed); NULL if this request is sent itself.
    reused_from     bigint,
    submitted_by    name NOT NULL DEFAULT current_user,
    created_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    queued_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    submitted_at    timestamptz,
    finished_at     timestamptz
);
COMMENT ON TABLE llmbatching.requests IS 'Every LLM request: its body, its state and, once answered, the response';
-- The queue of each group, oldest first. It carries each body's size and when it was queued:
-- the worker measures a group (its bytes, its oldest wait) without a probe of the table per
-- request (an index-only scan, which visits the table only for pages not yet vacuumed).
CREATE INDEX requests_queue ON llmbatching.requests (provider, account, endpoint, model, id)
    INCLUDE (body_bytes, queued_at)
    WHERE state = 'queued' AND reused_from IS NULL;
-- The same queue by role, so that a batch takes requests of every waiting role in turn. It
-- carries each body's size too: a claim plans its batch without a probe of the table per
-- request.
CREATE INDEX requests_queue_by_role ON llmbatching.requests (provider, account, endpoint, model, submitted_by, id)
    INCLUDE (body_bytes)
    WHERE state = 'queued' AND reused_from IS NULL;
-- Only ever searched for one hash: a hash index is smaller and cheaper to add to than a btree.
CREATE INDEX requests_hash ON llmbatching.requests USING hash (request_hash);
CREATE INDEX requests_waiting ON llmbatching.requests (reused_from) WHERE state = 'queued' AND reused_from IS NOT NULL;
CREATE INDEX requests_batch ON llmbatching.requests (batch_id) WHERE batch_id IS NOT NULL;
-- The cancelled requests of each batch: whether a batch has any, and how many, without reading
-- every request of it (cancelled requests are few, so this index stays small).
CREATE INDEX requests_cancelled ON llmbatching.requests (batch_id) WHERE state = 'cancelled' AND batch_id IS NOT NULL;
CREATE INDEX requests_job ON llmbatching.requests (job, state) WHERE job IS NOT NULL;
-- Requests that finished without a batch (cancelled while queued, answered from an identical
-- one, refused before sending), for retention; those a batch carried are found through it.
CREATE INDEX requests_finished ON llmbatching.requests (finished_at)
    WHERE batch_id IS NULL AND state IN ('completed', 'failed', 'cancelled');

-- Per-model caps on prompt tokens enqueued at the provider at once, overriding
-- llmbatching.max_enqueued_tokens for that model.
CREATE TABLE llmbatching.model_limits (
    model               text PRIMARY KEY,
    max_enqueued_tokens bigint NOT NULL CHECK (max_enqueued_tokens > 0)
);
COMMENT ON TABLE llmbatching.model_limits IS 'Per-model caps on enqueued prompt tokens (the provider''s limit for your tier)';

-- Models whose submissions wait, after the provider refused a batch for the enqueued-token limit.
CREATE TABLE llmbatching.model_pauses (
    model        text PRIMARY KEY,
    paused_until timestamptz NOT NULL,
    reason       text
);
COMMENT ON TABLE llmbatching.model_pauses IS 'Models whose new batches wait until paused_until';

-- Where an answer is written when it arrives: a column of one row of a user table, found by
-- the row's primary key.
CREATE TABLE llmbatching.writebacks (
    -- Not a foreign key, which would check and lock the request row for every write-back
    -- registered (a million of them for a million-row table); a write-back goes with its request
    -- when the request is deleted (trigger requests_deleted).
    request_id    bigint PRIMARY KEY,
    target        regclass NOT NULL,
    target_column name NOT NULL,
    row_key       jsonb NOT NULL,
    -- The role whose privileges the write runs with.
    submitted_by  name NOT NULL DEFAULT current_user,
    written_at    timestamptz,
    -- 'written', 'row missing' (deleted, or its key changed), or 'error: ...'
    outcome       text
)
-- Every row is updated once, when its answer is written: room left on each page lets that
-- update stay on the page (a heap-only tuple), with no new primary-key entry.
WITH (fillfactor = 50);
COMMENT ON TABLE llmbatching.writebacks IS 'Answers to write into a table column when they arrive, and what happened';
-- The write-backs of one row and column, for superseding older ones (its columns are never
-- updated, so writing an answer stays a heap-only update).
CREATE INDEX writebacks_row ON llmbatching.writebacks (target, target_column, row_key);

-- Answers that arrived and wait to be written into their rows by the worker, with when to try
-- next (a locked or slow target is tried again later). An entry holds requests of one role
-- that completed together (up to 1,000: those whose ids share their thousand), not one
-- request: the worker takes, counts and clears the write-backs of a whole chunk of answers
-- with one row of this table. An entry may name
-- requests without a write-back (the worker finds none for them), and a request may be in two
-- entries (the worker claims each write-back before writing it, so writes it once). Answers
-- whose table was locked or slow come back in an entry of their own table's, with its counts.
CREATE TABLE llmbatching.writeback_queue (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The role the write-backs run as: each role's entries are taken in turn.
    submitted_by name NOT NULL,
    request_ids  bigint[] NOT NULL,
    answers      integer NOT NULL GENERATED ALWAYS AS (pg_catalog.cardinality(request_ids)) STORED,
    due_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- Attempts so far (counted as each starts), and how many of them ran out of time.
    tries        integer NOT NULL DEFAULT 0,
    slow_tries   integer NOT NULL DEFAULT 0
);
CREATE INDEX writeback_queue_due ON llmbatching.writeback_queue (submitted_by, due_at);
COMMENT ON TABLE llmbatching.writeback_queue IS 'Answers waiting to be written back into their rows';

-- Answers that came back while their request's role kept the request (or its write-back, or an
-- identical request waiting on it) locked: `SELECT ... FOR UPDATE` in a transaction left open, or
-- a cancellation not yet committed. Waiting for the lock would hold up every other role's
-- answers, and leaving the request for a later reading would keep its whole batch open and
-- read again. So the answer is kept here, in the transaction that applies the others, and the
-- batch ends; the worker applies it once the lock is gone (trying again later and later while
-- it stays). Only the worker reads it: it holds answers of every role.
CREATE TABLE llmbatching.held_answers (
    request_id  bigint PRIMARY KEY,
    batch_id    bigint NOT NULL,
    -- The request's role: each role's kept answers are looked at in turn.
    submitted_by name NOT NULL,
    -- The result line as read (provider-neutral, redacted), as JSON: see results::LineResult.
    result      text NOT NULL,
    held_since  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    tries       integer NOT NULL DEFAULT 0,
    next_try_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX held_answers_due ON llmbatching.held_answers (next_try_at);
CREATE INDEX held_answers_role ON llmbatching.held_answers (submitted_by, next_try_at);
COMMENT ON TABLE llmbatching.held_answers IS 'Answers kept until the role holding their request locked lets go';

-- Prices in US dollars per million tokens, for the standard (synchronous) API and the batch
-- API, per provider: a row's provider is a kind ('openai', 'anthropic', 'azure') or a server's
-- name, which takes precedence (see llmbatching.price_of). Cached input tokens are billed at
-- the cached price; reasoning tokens are output tokens. A dated snapshot of a model is priced as
-- the model ('gpt-4o-mini-2024-07-18' as 'gpt-4o-mini'). Edit freely: prices change.
CREATE TABLE llmbatching.prices (
    model               text NOT NULL,
    input               numeric NOT NULL CHECK (input >= 0),
    cached_input        numeric CHECK (cached_input >= 0),
    output              numeric NOT NULL CHECK (output >= 0),
    batch_input         numeric NOT NULL CHECK (batch_input >= 0),
    batch_cached_input  numeric CHECK (batch_cached_input >= 0),
    batch_output        numeric NOT NULL CHECK (batch_output >= 0),
    taken_on            date NOT NULL,
    source              text,
    provider            text NOT NULL DEFAULT 'openai',
    PRIMARY KEY (provider, model)
);
COMMENT ON TABLE llmbatching.prices IS 'USD per million tokens, standard and batch; editable';

CREATE FUNCTION llmbatching.price_replaced() RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    UPDATE llmbatching.prices p
       SET input = NEW.input, cached_input = NEW.cached_input, output = NEW.output,
           batch_input = NEW.batch_input, batch_cached_input = NEW.batch_cached_input,
           batch_output = NEW.batch_output, taken_on = NEW.taken_on, source = NEW.source
     WHERE p.provider OPERATOR(pg_catalog.=) NEW.provider AND p.model OPERATOR(pg_catalog.=) NEW.model;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER price_replaced BEFORE INSERT ON llmbatching.prices
    FOR EACH ROW EXECUTE FUNCTION llmbatching.price_replaced();
INSERT INTO llmbatching.prices
    (model, input, cached_input, output, batch_input, batch_cached_input, batch_output, taken_on, source)
VALUES
    ('gpt-5',                  1.25,  0.125,  10.00, 0.625,  0.0625,  5.00, '2025-08-15', 'https://openai.com/api/pricing'),
    ('gpt-5-mini',             0.25,  0.025,   2.00, 0.125,  0.0125,  1.00, '2025-08-15', 'https://openai.com/api/pricing'),
    ('gpt-5-nano',             0.05,  0.005,   0.40, 0.025,  0.0025,  0.20, '2025-08-15', 'https://openai.com/api/pricing'),
    ('gpt-4.1',                2.00,  0.50,    8.00, 1.00,   0.25,    4.00, '2025-08-15', 'https://openai.com/api/pricing'),
    ('gpt-4.1-mini',           0.40,  0.10,    1.60, 0.20,   0.05,    0.80, '2025-08-15', 'https://openai.com/api/pricing'),
    ('gpt-4.1-nano',           0.10,  0.025,   0.40, 0.05,   0.0125,  0.20, '2025-08-15', 'https://openai.com/api/pricing'),
    ('gpt-4o',                 2.50,  1.25,   10.00, 1.25,   0.625,   5.00, '2025-08-15', 'https://openai.com/api/pricing'),
    ('gpt-4o-mini',            0.15,  0.075,   0.60, 0.075,  0.0375,  0.30, '2025-08-15', 'https://openai.com/api/pricing'),
    ('o3',                     2.00,  0.50,    8.00, 1.00,   0.25,    4.00, '2025-08-15', 'https://openai.com/api/pricing'),
    ('o4-mini',                1.10,  0.275,   4.40, 0.55,   0.1375,  2.20, '2025-08-15', 'https://openai.com/api/pricing'),
    ('text-embedding-3-small', 0.02,  NULL,    0.00, 0.01,   NULL,    0.00, '2025-08-15', 'https://openai.com/api/pricing'),
    ('text-embedding-3-large', 0.13,  NULL,    0.00, 0.065,  NULL,    0.00, '2025-08-15', 'https://openai.com/api/pricing'),
    ('omni-moderation-latest', 0.00,  NULL,    0.00, 0.00,   NULL,    0.00, '2025-08-15', 'https://openai.com/api/pricing');
-- Anthropic: batch prices are half the standard ones; cache reads are a tenth of input.
INSERT INTO llmbatching.prices
    (provider, model, input, cached_input, output, batch_input, batch_cached_input, batch_output, taken_on, source)
VALUES
    ('anthropic', 'claude-opus-4-5',   5.00, 0.50,  25.00, 2.50, 0.25,  12.50, '2025-11-24', 'https://docs.claude.com/en/docs/about-claude/pricing'),
    ('anthropic', 'claude-opus-4-1',  15.00, 1.50,  75.00, 7.50, 0.75,  37.50, '2025-11-24', 'https://docs.claude.com/en/docs/about-claude/pricing'),
    ('anthropic', 'claude-sonnet-4-5', 3.00, 0.30,  15.00, 1.50, 0.15,   7.50, '2025-11-24', 'https://docs.claude.com/en/docs/about-claude/pricing'),
    ('anthropic', 'claude-sonnet-4',   3.00, 0.30,  15.00, 1.50, 0.15,   7.50, '2025-11-24', 'https://docs.claude.com/en/docs/about-claude/pricing'),
    ('anthropic', 'claude-haiku-4-5',  1.00, 0.10,   5.00, 0.50, 0.05,   2.50, '2025-11-24', 'https://docs.claude.com/en/docs/about-claude/pricing'),
    ('anthropic', 'claude-3-5-haiku',  0.80, 0.08,   4.00, 0.40, 0.04,   2.00, '2025-11-24', 'https://docs.claude.com/en/docs/about-claude/pricing');

-- Every table's rows (and the id sequences) go into pg_dump's dumps: requests with their answers,
-- batches in flight, write-backs, the administrator's limits, pauses and prices, and the
-- installation's identity, by which a restored database knows it is a copy.
SELECT pg_catalog.pg_extension_config_dump('llmbatching.instance', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.requests', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.requests_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.batches', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.batches_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.writebacks', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.writeback_queue', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.writeback_queue_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.held_answers', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.model_limits', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.model_pauses', '');
SELECT pg_catalog.pg_extension_config_dump('llmbatching.prices', '');
