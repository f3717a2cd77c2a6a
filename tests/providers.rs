//! Every kind of provider, configured as foreign servers with keys in user mappings, carrying
//! requests end to end against the emulator's OpenAI, Azure OpenAI and Anthropic protocols: one
//! database served by several providers at once, keys per role, faults per protocol, and a
//! create call whose answer was lost.

mod common;

use common::{quick, Cluster, EmulatorConfig};
use llmbatching_emulator::Fault;
use postgres::Client;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(60);
const ANTHROPIC_KEY: &str = "sk-ant-public-0123456789";
const AZURE_KEY: &str = "azure-key-0123456789";

/// A cluster with the extension, the servers `claude` (Anthropic) and `azure` (Azure OpenAI) on
/// the emulator, each with a key for PUBLIC, and the roles alice and bob.
fn three_providers(emulator: EmulatorConfig, settings: &[(&str, &str)]) -> Cluster {
    let cluster = Cluster::start(emulator, settings);
    let anthropic = cluster.emulator.anthropic_base_url.clone();
    let azure = cluster.emulator.azure_base_url.clone();
    cluster
        .client()
        .batch_execute(&format!(
            "CREATE EXTENSION llmbatching;
             CREATE SERVER claude FOREIGN DATA WRAPPER llmbatching
                 OPTIONS (kind 'anthropic', api_base '{anthropic}');
             CREATE USER MAPPING FOR PUBLIC SERVER claude OPTIONS (api_key '{ANTHROPIC_KEY}');
             CREATE SERVER azure FOREIGN DATA WRAPPER llmbatching
                 OPTIONS (kind 'azure', api_base '{azure}', api_version '2024-10-21');
             CREATE USER MAPPING FOR PUBLIC SERVER azure OPTIONS (api_key '{AZURE_KEY}');
             CREATE ROLE alice LOGIN IN ROLE llmbatching_user;
             CREATE ROLE bob LOGIN IN ROLE llmbatching_user;
             GRANT USAGE ON FOREIGN SERVER claude, azure TO llmbatching_user;
             GRANT CREATE ON SCHEMA public TO alice;"
        ))
        .unwrap();
    cluster
}

fn one<T: for<'a> postgres::types::FromSql<'a>>(c: &mut Client, sql: &str) -> T {
    c.query_one(sql, &[]).unwrap().get(0)
}

fn refused(c: &mut Client, sql: &str) -> String {
    let err = c.batch_execute(sql).expect_err(sql);
    err.as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| err.to_string())
}

#[test]
fn three_providers_serve_one_database_at_once() {
    let cluster = three_providers(quick(), &[]);
    let mut admin = cluster.client();
    let mut alice = cluster.client_as("alice");
    alice
        .batch_execute(
            "CREATE TABLE asked (id int, provider text, request bigint, PRIMARY KEY (id, provider));
             INSERT INTO asked
             SELECT g, p, CASE p WHEN 'openai' THEN llm_submit('gpt-4o-mini', 'open ' || g)
                                 WHEN 'claude' THEN llm_submit('claude-x', 'claude ' || g, provider => 'claude')
                                 ELSE llm_submit('my-deployment', 'azure ' || g, provider => 'azure') END
               FROM generate_series(1, 6) g,
                    unnest(ARRAY['openai', 'claude', 'azure']) p;",
        )
        .unwrap();
    let label: i64 = one(
        &mut alice,
        "SELECT llm_submit_label('claude-x', 'this is positive', ARRAY['negative', 'positive'], provider => 'claude')",
    );
    let json: i64 = one(
        &mut alice,
        "SELECT llm_submit_json('claude-x', 'shape', '{\"type\": \"object\", \"properties\": {\"word\": {\"type\": \"string\"}}}',
                                instructions => 'Answer in JSON', provider => 'claude')",
    );
    cluster.wait_until_settled(SETTLE);

    let answers = alice
        .query(
            "SELECT a.provider, r.endpoint, r.state, llm_result(a.request), r.input_tokens > 0
               FROM asked a JOIN llmbatching.requests r ON r.id = a.request ORDER BY a.provider, a.id",
            &[],
        )
        .unwrap();
    assert_eq!(answers.len(), 18);
    for row in &answers {
        let (provider, endpoint, state): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        assert_eq!(state, "completed", "{provider}");
        let expected_endpoint = match provider.as_str() {
            "openai" => "/v1/responses",
            "claude" => "/v1/messages",
            _ => "/v1/chat/completions",
        };
        assert_eq!(endpoint, expected_endpoint);
        let text: String = row.get(3);
        let model = match provider.as_str() {
            "openai" => "gpt-4o-mini",
            "claude" => "claude-x",
            _ => "my-deployment",
        };
        assert!(
            text.starts_with(&format!("[{model}] ")),
            "{provider}: {text}"
        );
        assert!(row.get::<_, bool>(4), "{provider}: no usage");
    }
    let labelled: String = one(&mut alice, &format!("SELECT llm_result({label})"));
    assert_eq!(labelled, "positive");
    let shaped: serde_json::Value = one(&mut alice, &format!("SELECT llm_answer_json({json})"));
    assert_eq!(shaped["word"], "shape");
    // Anthropic's cache reads are counted as cached input tokens.
    let cached: i64 = one(
        &mut alice,
        "SELECT sum(cached_tokens)::bigint FROM llmbatching.requests WHERE provider = 'claude'",
    );
    assert!(cached > 0);

    // One batch per provider, each billed under that provider's key, none twice.
    let per_provider: Vec<(String, i64)> = admin
        .query(
            "SELECT provider, count(*) FROM llmbatching.batches GROUP BY provider ORDER BY provider",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        per_provider
            .iter()
            .map(|(p, _)| p.as_str())
            .collect::<Vec<_>>(),
        ["azure", "claude", "openai"]
    );
    let stats = cluster.emulator.stats();
    assert!(stats.ran_more_than_once().is_empty());
    assert!(stats.creates_per_key.contains_key(ANTHROPIC_KEY));
    assert!(stats.creates_per_key.contains_key(AZURE_KEY));
    // An Anthropic batch read back is deleted there (its results with it).
    cluster.wait_for("the Anthropic batches to be deleted", SETTLE, || {
        cluster.emulator.stats().batches_deleted as i64
            == cluster.count("SELECT count(*) FROM llmbatching.batches WHERE provider = 'claude'")
    });
    // Costs are per provider: a model is priced by a row for its server, else for its kind.
    let unpriced: i64 = one(
        &mut alice,
        "SELECT count(*) FROM llmbatching.request_costs WHERE model = 'claude-x' AND priced_as IS NULL",
    );
    assert_eq!(unpriced, 8);
    admin
        .batch_execute(
            "INSERT INTO llmbatching.prices (provider, model, input, output, batch_input, batch_output, taken_on)
             VALUES ('anthropic', 'claude-x', 2, 10, 1, 5, current_date),
                    ('claude', 'claude-x', 4, 20, 2, 10, current_date),
                    ('anthropic', 'my-deployment', 100, 100, 100, 100, current_date),
                    ('openai', 'my-deployment', 2, 8, 1, 4, current_date);",
        )
        .unwrap();
    let (claude_cost, expected): (f64, f64) = {
        let row = alice
            .query_one(
                "SELECT sum(c.cost)::float8,
                        sum(((r.input_tokens - r.cached_tokens) * 2 + r.cached_tokens * 2 + r.output_tokens * 10) / 1e6)::float8
                   FROM llmbatching.request_costs c JOIN llmbatching.requests r USING (id)
                  WHERE r.provider = 'claude' AND r.model = 'claude-x'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        (claude_cost - expected).abs() < 1e-9,
        "{claude_cost} {expected}"
    );
    // Azure OpenAI is priced as OpenAI unless it has rows of its own.
    let azure_priced: i64 = one(
        &mut alice,
        "SELECT count(*) FROM llmbatching.request_costs
          WHERE provider = 'azure' AND cost > 0 AND cost < 0.001",
    );
    assert_eq!(azure_priced, 6);
    // The same body to two providers is two requests; the same again to one is deduplicated.
    let (first, second, again): (i64, i64, i64) = {
        let row = alice
            .query_one(
                "SELECT llm_submit('same-model', 'same words', endpoint => '/v1/chat/completions'),
                        llm_submit('same-model', 'same words', endpoint => '/v1/chat/completions', provider => 'azure'),
                        llm_submit('same-model', 'same words', endpoint => '/v1/chat/completions', provider => 'azure')",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    let leaders: Vec<Option<i64>> = [first, second, again]
        .iter()
        .map(|id| {
            alice
                .query_one(
                    "SELECT reused_from FROM llmbatching.requests WHERE id = $1",
                    &[id],
                )
                .unwrap()
                .get(0)
        })
        .collect();
    assert_eq!(leaders, [None, None, Some(second)]);
    assert!(!cluster.log().contains(ANTHROPIC_KEY));
    assert!(!cluster.log().contains(AZURE_KEY));
}

#[test]
fn a_role_with_its_own_key_is_billed_apart_and_keys_stay_hidden() {
    let cluster = three_providers(quick(), &[]);
    cluster
        .client()
        .batch_execute(
            "CREATE USER MAPPING FOR alice SERVER claude OPTIONS (api_key 'sk-ant-alice-0123456789')",
        )
        .unwrap();
    let mut alice = cluster.client_as("alice");
    let mut bob = cluster.client_as("bob");
    alice
        .batch_execute("SELECT llm_submit('claude-x', 'a' || g, provider => 'claude') FROM generate_series(1, 5) g")
        .unwrap();
    bob.batch_execute("SELECT llm_submit('claude-x', 'b' || g, provider => 'claude') FROM generate_series(1, 5) g")
        .unwrap();
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        10
    );
    // Requests under different keys never share a batch.
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM (SELECT batch_id FROM llmbatching.requests
                                    GROUP BY batch_id HAVING count(DISTINCT account) > 1) mixed"
        ),
        0
    );
    let creates = cluster.emulator.stats().creates_per_key;
    assert_eq!(
        creates.get("sk-ant-alice-0123456789"),
        Some(&1),
        "{creates:?}"
    );
    assert_eq!(creates.get(ANTHROPIC_KEY), Some(&1), "{creates:?}");
    // The account is the trigger's choice: a direct INSERT cannot pick alice's key.
    let err = refused(
        &mut bob,
        "INSERT INTO llmbatching.requests (provider, endpoint, model, body, account)
         VALUES ('claude', '/v1/messages', 'm', '{\"model\": \"m\", \"max_tokens\": 5, \"messages\": []}', 'alice')",
    );
    assert!(err.contains("permission denied"), "{err}");
    bob.batch_execute(
        "INSERT INTO llmbatching.requests (provider, endpoint, model, body)
         VALUES ('claude', '/v1/messages', 'm', '{\"model\": \"m\", \"max_tokens\": 5, \"messages\": []}')",
    )
    .unwrap();
    let account: String = one(
        &mut bob,
        "SELECT account FROM llmbatching.requests WHERE submitted_by = 'bob' ORDER BY id DESC LIMIT 1",
    );
    assert_eq!(account, "");
    // Keys: users see none (their own mapping's at most), views and logs show none.
    let public_key: Option<Vec<String>> = one(
        &mut alice,
        "SELECT umoptions FROM pg_user_mappings WHERE srvname = 'claude' AND usename = 'public'",
    );
    assert_eq!(public_key, None);
    let err = refused(&mut alice, "SELECT * FROM pg_user_mapping");
    assert!(err.contains("permission denied"), "{err}");
    for secret in [ANTHROPIC_KEY, "sk-ant-alice-0123456789"] {
        assert!(!cluster.log().contains(secret));
    }
}

#[test]
fn servers_and_submissions_are_checked_with_clear_errors() {
    let cluster = three_providers(quick(), &[]);
    let mut admin = cluster.client();
    for (sql, expected) in [
        ("CREATE SERVER s1 FOREIGN DATA WRAPPER llmbatching", "needs the option \"kind\""),
        ("CREATE SERVER s2 FOREIGN DATA WRAPPER llmbatching OPTIONS (kind 'bard')", "unknown provider kind \"bard\""),
        ("CREATE SERVER s3 FOREIGN DATA WRAPPER llmbatching OPTIONS (kind 'azure')", "needs the option \"api_base\""),
        ("CREATE SERVER s4 FOREIGN DATA WRAPPER llmbatching OPTIONS (kind 'openai', api_key 'sk-x')", "not a server option"),
        ("CREATE SERVER s5 FOREIGN DATA WRAPPER llmbatching OPTIONS (kind 'openai', colour 'red')", "invalid option \"colour\""),
        ("CREATE USER MAPPING FOR bob SERVER claude OPTIONS (password 'x')", "invalid option \"password\""),
        ("CREATE USER MAPPING FOR bob SERVER claude", "needs the option \"api_key\""),
    ] {
        let err = refused(&mut admin, sql);
        assert!(err.contains(expected), "{sql}: {err}");
    }
    admin
        .batch_execute(
            "CREATE SERVER keyless FOREIGN DATA WRAPPER llmbatching OPTIONS (kind 'anthropic');
             GRANT USAGE ON FOREIGN SERVER keyless TO alice;
             CREATE SERVER private FOREIGN DATA WRAPPER llmbatching OPTIONS (kind 'openai');
             CREATE USER MAPPING FOR PUBLIC SERVER private OPTIONS (api_key 'sk-private-0123456789');",
        )
        .unwrap();
    let mut alice = cluster.client_as("alice");
    for (sql, expected) in [
        (
            "SELECT llm_submit('m', 'x', provider => 'keyless')",
            "provider \"keyless\" has no key for role alice",
        ),
        (
            "SELECT llm_submit('m', 'x', provider => 'private')",
            "permission denied for provider \"private\"",
        ),
        (
            "SELECT llm_submit('m', 'x', provider => 'claude', endpoint => '/v1/embeddings')",
            "does not batch /v1/embeddings",
        ),
        (
            "SELECT llm_submit_body('{\"model\": \"m\", \"messages\": []}', provider => 'claude')",
            "must set \"max_tokens\"",
        ),
    ] {
        let err = refused(&mut alice, sql);
        assert!(err.contains(expected), "{sql}: {err}");
    }
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests"),
        0
    );
    // The default provider is a setting.
    alice
        .batch_execute("SET llmbatching.default_provider = 'claude'; SELECT llm_submit('claude-x', 'by default')")
        .unwrap();
    let provider: String = one(
        &mut alice,
        "SELECT provider || ' ' || endpoint FROM llmbatching.requests",
    );
    assert_eq!(provider, "claude /v1/messages");
}

#[test]
fn anthropic_faults_never_lose_a_request_nor_pay_twice() {
    let mut faults = std::collections::BTreeMap::new();
    faults.insert(
        "get".to_string(),
        Fault {
            error_rate: 0.3,
            statuses: vec![429, 500, 529],
            ..Fault::default()
        },
    );
    let cluster = three_providers(
        EmulatorConfig {
            late_output_polls: 2,
            content_outage_ms: 1500,
            noisy_results: true,
            faults,
            ..quick()
        },
        &[],
    );
    let mut alice = cluster.client_as("alice");
    alice
        .batch_execute(
            "SELECT llm_submit('claude-x', 'q' || g || CASE WHEN g % 5 = 0 THEN ' EMULATOR_FAIL' ELSE '' END,
                               provider => 'claude')
               FROM generate_series(1, 20) g",
        )
        .unwrap();
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.requests WHERE state = 'completed' AND attempts = 1"
        ),
        16
    );
    let failed: Vec<String> = alice
        .query(
            "SELECT error FROM llmbatching.requests WHERE state = 'failed'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(failed.len(), 4);
    assert!(
        failed.iter().all(|e| e.contains("invalid_request_error")),
        "{failed:?}"
    );
    let stats = cluster.emulator.stats();
    assert!(stats.faults_injected > 0);
    assert_eq!(stats.batches_created, 1);
    assert!(stats.ran_more_than_once().is_empty());
}

#[test]
fn an_anthropic_batch_whose_create_answer_was_lost_is_found_again() {
    let mut faults = std::collections::BTreeMap::new();
    faults.insert(
        "create".to_string(),
        Fault {
            drop_rate: 1.0,
            ..Fault::default()
        },
    );
    let cluster = three_providers(EmulatorConfig { faults, ..quick() }, &[]);
    let mut alice = cluster.client_as("alice");
    // Two batches of different sizes, created one after the other: each is found as its own.
    alice
        .batch_execute(
            "SELECT llm_submit('claude-x', 'a' || g, provider => 'claude') FROM generate_series(1, 3) g;
             SELECT llm_submit('claude-y', 'b' || g, provider => 'claude') FROM generate_series(1, 4) g;",
        )
        .unwrap();
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        7
    );
    let stats = cluster.emulator.stats();
    assert_eq!(stats.batches_created, 2, "a batch was created twice");
    assert!(stats.ran_more_than_once().is_empty());
    assert!(cluster
        .log()
        .contains("was already created at the provider"));
}

#[test]
fn an_expired_or_cancelled_anthropic_batch_keeps_what_ran_and_frees_its_slot() {
    let cluster = three_providers(
        EmulatorConfig {
            expire_next: 1,
            expire_fraction: 0.5,
            ..quick()
        },
        &[],
    );
    let mut alice = cluster.client_as("alice");
    alice
        .batch_execute("SELECT llm_submit('claude-x', 'e' || g, provider => 'claude') FROM generate_series(1, 10) g")
        .unwrap();
    cluster.wait_until_settled(SETTLE);
    // Half ran before the batch expired; the rest went again in a second batch.
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        10
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE attempts = 2"),
        5
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.batches WHERE provider_status = 'expired'"),
        1
    );
    assert!(cluster.emulator.stats().ran_more_than_once().is_empty());

    // Cancelling every request of a batch in flight cancels it at Anthropic and frees its slot.
    cluster.emulator.configure(|c| c.in_progress_ms = 60_000);
    alice
        .batch_execute("SELECT llm_submit('claude-x', 'c' || g, provider => 'claude') FROM generate_series(1, 4) g")
        .unwrap();
    cluster.wait_for("the batch to be sent", SETTLE, || {
        cluster.count("SELECT count(*) FROM llmbatching.batches WHERE state = 'submitted'") == 1
    });
    alice
        .batch_execute("SELECT llm_cancel(id) FROM llmbatching.requests WHERE state = 'submitted'")
        .unwrap();
    cluster.wait_for("the cancelled batch to close", SETTLE, || {
        cluster.count("SELECT count(*) FROM llmbatching.batches WHERE state <> 'done'") == 0
    });
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.batches WHERE cancel_sent_at IS NOT NULL AND provider_status = 'cancelled'"),
        1
    );
}

#[test]
fn the_enqueued_token_cap_is_counted_per_provider_and_key() {
    // The cap leaves room for one batch of the model at a time under each key.
    let cluster = three_providers(
        EmulatorConfig {
            in_progress_ms: 2000,
            ..quick()
        },
        &[
            ("llmbatching.batch_max_requests", "10"),
            ("llmbatching.max_enqueued_tokens", "250"),
        ],
    );
    let mut alice = cluster.client_as("alice");
    alice
        .batch_execute(
            "SELECT llm_submit('shared-model', 'o' || g, endpoint => '/v1/chat/completions') FROM generate_series(1, 20) g;
             SELECT llm_submit('shared-model', 'a' || g, endpoint => '/v1/chat/completions', provider => 'azure')
               FROM generate_series(1, 10) g;",
        )
        .unwrap();
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        30
    );
    assert!(cluster.count("SELECT max(estimated_tokens) FROM llmbatching.batches") <= 250);
    // An Azure batch and an OpenAI batch (under different keys) were at the provider at once
    // with more tokens together than one cap: each key's batches count against its own.
    assert!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.batches a, llmbatching.batches o
              WHERE a.provider = 'azure' AND o.provider = 'openai'
                AND a.estimated_tokens + o.estimated_tokens > 250
                AND a.submitted_at < o.ended_at AND o.submitted_at < a.ended_at"
        ) > 0
    );
    assert!(cluster.emulator.stats().ran_more_than_once().is_empty());
}
