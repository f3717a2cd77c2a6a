-- Providers are foreign servers of the validator-only wrapper llmbatching, and their keys are
-- user mappings, as PostgreSQL keeps credentials for outside services (see
-- src/provider/servers.rs for the options):
--
--   CREATE SERVER claude FOREIGN DATA WRAPPER llmbatching
--     OPTIONS (kind 'anthropic', api_base 'https://api.anthropic.com/v1');
--   CREATE USER MAPPING FOR PUBLIC SERVER claude OPTIONS (api_key 'sk-ant-...');
--   GRANT USAGE ON FOREIGN SERVER claude TO analyst;
--
-- The server openai is created here. Without a user mapping it uses llmbatching.api_base and
-- the key of llmbatching.api_key_file or OPENAI_API_KEY, so that a cluster configured by those
-- settings needs nothing else.
CREATE FOREIGN DATA WRAPPER llmbatching VALIDATOR llmbatching.fdw_validator;
COMMENT ON FOREIGN DATA WRAPPER llmbatching IS 'LLM batch providers: its servers are providers, their user mappings hold the keys';

CREATE SERVER openai FOREIGN DATA WRAPPER llmbatching OPTIONS (kind 'openai');
COMMENT ON SERVER openai IS 'OpenAI: llmbatching.api_base and the server-wide key unless a user mapping says otherwise';
