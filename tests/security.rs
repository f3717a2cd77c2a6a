//! Sharing one database: every check here runs as an ordinary role and asserts the refusal.

mod common;

use common::{quick, Cluster, EmulatorConfig, API_KEY};
use llmbatching_emulator::answers::echo_answer;
use postgres::Client;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(180);

/// A cluster with the extension, users alice and bob, admin carol and a stranger with no grants.
fn shared_database(emulator: EmulatorConfig, settings: &[(&str, &str)]) -> Cluster {
    let cluster = Cluster::start(emulator, settings);
    cluster
        .client()
        .batch_execute(
            "CREATE EXTENSION llmbatching;
             CREATE ROLE alice LOGIN IN ROLE llmbatching_user;
             CREATE ROLE bob LOGIN IN ROLE llmbatching_user;
             CREATE ROLE carol LOGIN IN ROLE llmbatching_admin;
             CREATE ROLE stranger LOGIN;",
        )
        .unwrap();
    cluster
}

fn refused(c: &mut Client, sql: &str) -> String {
    let err = c.batch_execute(sql).expect_err(sql);
    err.as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| err.to_string())
}

fn one<T: for<'a> postgres::types::FromSql<'a>>(c: &mut Client, sql: &str) -> T {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn roles_without_grants_get_nothing() {
    let cluster = shared_database(quick(), &[]);
    let mut stranger = cluster.client_as("stranger");
    for sql in [
        "SELECT llmbatching.llm_submit('m', 'x')",
        "SELECT llmbatching.llm_status(1)",
        "SELECT llmbatching.llm_result(1)",
        "SELECT * FROM llmbatching.llm_job_status('x')",
        "SELECT llmbatching.llm_wait(job => 'x')",
    ] {
        assert!(
            refused(&mut stranger, sql).contains("permission denied for schema llmbatching"),
            "{sql}"
        );
    }
    // Unqualified, the schema is not on a stranger's path at all.
    assert!(refused(&mut stranger, "SELECT llm_submit('m', 'x')").contains("does not exist"));
    for sql in [
        "SELECT * FROM llmbatching.requests",
        "SELECT * FROM llmbatching.batches",
        "SELECT * FROM llmbatching.instance",
    ] {
        assert!(
            refused(&mut stranger, sql).contains("permission denied for schema llmbatching"),
            "{sql}"
        );
    }
    let mut alice = cluster.client_as("alice");
    assert!(refused(&mut alice, "SELECT llm_purge('1 day')")
        .contains("permission denied for function llm_purge"));
    assert!(refused(
        &mut alice,
        "INSERT INTO llmbatching.model_limits VALUES ('m', 1)"
    )
    .contains("permission denied"));
    assert!(refused(&mut alice, "SELECT * FROM llmbatching.instance").contains("permission denied"));
    assert!(refused(&mut alice, "SELECT * FROM llmbatching.batches").contains("permission denied"));
    assert!(
        refused(&mut alice, "SELECT * FROM llmbatching.writeback_queue")
            .contains("permission denied")
    );
}

#[test]
fn each_role_sees_and_cancels_only_its_own_requests_unless_admin() {
    let cluster = shared_database(quick(), &[("llmbatching.batch_wait", "1h")]);
    let (mut alice, mut bob, mut carol) = (
        cluster.client_as("alice"),
        cluster.client_as("bob"),
        cluster.client_as("carol"),
    );
    let a: i64 = one(
        &mut alice,
        "SELECT llm_submit('m', 'alice secret', job => 'shared')",
    );
    let b: i64 = one(
        &mut bob,
        "SELECT llm_submit('m', 'bob secret', job => 'shared')",
    );
    let b2: i64 = one(&mut bob, "SELECT llm_submit('m', 'bob other')");

    assert_eq!(
        one::<i64>(&mut alice, "SELECT count(*) FROM llmbatching.requests"),
        1
    );
    let row = alice
        .query_one(
            "SELECT llm_status($1), llm_result($1), llm_error($1), llm_result_json($1)",
            &[&b],
        )
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0),
        None,
        "alice reads bob's status"
    );
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert!(
        !alice
            .query_one("SELECT llm_cancel($1)", &[&b])
            .unwrap()
            .get::<_, bool>(0),
        "alice cancelled bob's request"
    );
    assert_eq!(
        one::<i64>(&mut alice, "SELECT total FROM llm_job_status('shared')"),
        1
    );
    assert_eq!(
        one::<i64>(&mut carol, "SELECT total FROM llm_job_status('shared')"),
        2
    );
    assert_eq!(
        one::<i64>(&mut carol, "SELECT count(*) FROM llmbatching.requests"),
        3
    );
    assert!(
        carol
            .query_one("SELECT llm_cancel($1)", &[&b2])
            .unwrap()
            .get::<_, bool>(0),
        "the admin cancels anyone's"
    );

    cluster.set(&[("llmbatching.batch_wait", "0")]);
    cluster.wait_until_settled(SETTLE);
    let answer: Option<String> = alice
        .query_one("SELECT llm_result($1)", &[&a])
        .unwrap()
        .get(0);
    assert_eq!(answer, Some(echo_answer("m", "alice secret")));
    assert_eq!(
        bob.query_one("SELECT llm_result($1)", &[&b])
            .unwrap()
            .get::<_, Option<String>>(0),
        Some(echo_answer("m", "bob secret"))
    );
    assert_eq!(
        alice
            .query_one("SELECT llm_result($1)", &[&b])
            .unwrap()
            .get::<_, Option<String>>(0),
        None
    );
    let seen: i64 = one(
        &mut alice,
        "SELECT count(*) FROM llmbatching.requests WHERE body::text LIKE '%bob%'",
    );
    assert_eq!(seen, 0);
    assert_eq!(one::<i64>(&mut carol, "SELECT llm_purge('0 seconds')"), 3);
}

#[test]
fn direct_writes_to_the_state_tables_are_checked_or_refused() {
    let cluster = shared_database(quick(), &[("llmbatching.batch_wait", "1h")]);
    let mut alice = cluster.client_as("alice");
    let mine: i64 = one(&mut alice, "SELECT llm_submit('m', 'mine')");
    let bobs: i64 = one(
        &mut cluster.client_as("bob"),
        "SELECT llm_submit('m', 'bobs')",
    );
    let cases = [
        ("INSERT INTO llmbatching.requests (endpoint, model, body) VALUES ('/v1/responses', 'm', '{\"model\": \"m\", \"stream\": true}')".to_string(),
         "may not set \"stream\""),
        ("INSERT INTO llmbatching.requests (endpoint, model, body) VALUES ('/v1/responses', 'other', '{\"model\": \"m\"}')".to_string(),
         "\"model\": must equal the body's \"model\""),
        ("INSERT INTO llmbatching.requests (endpoint, model, body) VALUES ('/v1/nope', 'm', '{\"model\": \"m\"}')".to_string(),
         "unknown endpoint"),
        ("INSERT INTO llmbatching.requests (endpoint, model, body, submitted_by) VALUES ('/v1/responses', 'm', '{\"model\": \"m\"}', 'bob')".to_string(),
         "permission denied"),
        (format!("UPDATE llmbatching.requests SET state = 'completed' WHERE id = {mine}"), "violates row-level security policy"),
        (format!("UPDATE llmbatching.requests SET result_text = 'forged' WHERE id = {mine}"), "permission denied"),
        ("UPDATE llmbatching.batches SET state = 'done'".to_string(), "permission denied"),
        (format!("DELETE FROM llmbatching.requests WHERE id = {mine}"), "permission denied"),
    ];
    for (sql, expected) in cases {
        let message = refused(&mut alice, &sql);
        assert!(message.contains(expected), "{sql}: {message}");
    }
    let touched = alice
        .execute(
            "UPDATE llmbatching.requests SET state = 'cancelled' WHERE id = $1",
            &[&bobs],
        )
        .unwrap();
    assert_eq!(touched, 0, "alice cancelled bob's request directly");
    // The checked direct insert works: the table itself is part of the API.
    let direct = alice
        .execute("INSERT INTO llmbatching.requests (endpoint, model, body) VALUES ('/v1/responses', 'm', '{\"model\": \"m\", \"input\": \"direct\"}')", &[])
        .unwrap();
    assert_eq!(direct, 1);
    assert_eq!(
        one::<String>(
            &mut alice,
            "SELECT submitted_by::text FROM llmbatching.requests WHERE body->>'input' = 'direct'"
        ),
        "alice"
    );
}

#[test]
fn answers_are_written_back_only_where_the_submitting_role_may_update() {
    let cluster = shared_database(quick(), &[]);
    let mut admin = cluster.client();
    admin
        .batch_execute(
            "CREATE TABLE payroll (id int PRIMARY KEY, note text);
             INSERT INTO payroll VALUES (1, 'untouched');
             GRANT SELECT ON payroll TO alice;
             CREATE TABLE shared_notes (id int PRIMARY KEY, body text, summary text);
             INSERT INTO shared_notes VALUES (1, 'hello'), (2, 'world');
             GRANT SELECT, UPDATE ON shared_notes TO alice;",
        )
        .unwrap();
    let mut alice = cluster.client_as("alice");
    let message = refused(
        &mut alice,
        "SELECT llm_classify('payroll', 'note', $$'x' || note$$, 'm')",
    );
    assert!(
        message.contains("\"target_column\": permission denied to update public.payroll.note"),
        "{message}"
    );
    let id: i64 = one(&mut alice, "SELECT llm_submit('m', 'sneaky')");
    let message = refused(
        &mut alice,
        &format!("SELECT llm_write_back({id}, 'payroll', 'note', '{{\"id\": 1}}')"),
    );
    assert!(message.contains("permission denied"), "{message}");
    let message = refused(
        &mut alice,
        &format!("INSERT INTO llmbatching.writebacks (request_id, target, target_column, row_key) VALUES ({id}, 'payroll', 'note', '{{\"id\": 1}}')"),
    );
    assert!(message.contains("row-level security"), "{message}");

    // Allowed at registration, revoked before the answer arrives: the write is refused then too.
    cluster.set(&[("llmbatching.batch_wait", "1h")]);
    std::thread::sleep(Duration::from_millis(300));
    alice
        .batch_execute(
            "SELECT llm_classify('shared_notes', 'summary', 'body', 'm', job => 'notes')",
        )
        .unwrap();
    admin
        .batch_execute("REVOKE UPDATE ON shared_notes FROM alice")
        .unwrap();
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    cluster.wait_until_settled(SETTLE);
    let outcomes: Vec<String> = admin
        .query(
            "SELECT outcome FROM llmbatching.writebacks WHERE target = 'shared_notes'::regclass",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(outcomes.len(), 2);
    assert!(
        outcomes
            .iter()
            .all(|o| o.contains("permission denied for table shared_notes")),
        "{outcomes:?}"
    );
    assert_eq!(
        one::<i64>(
            &mut admin,
            "SELECT count(*) FROM shared_notes WHERE summary IS NOT NULL"
        ),
        0
    );
    assert_eq!(
        one::<String>(&mut admin, "SELECT note FROM payroll"),
        "untouched"
    );
}

#[test]
fn the_api_key_never_reaches_an_ordinary_role_a_monitoring_role_or_the_log() {
    let cluster = shared_database(
        EmulatorConfig {
            api_key: Some(API_KEY.into()),
            ..quick()
        },
        &[],
    );
    let mut admin = cluster.client();
    admin
        .batch_execute("CREATE ROLE watcher LOGIN IN ROLE pg_monitor, pg_read_all_settings")
        .unwrap();
    // The key is no setting at all: nobody, superusers included, can read or set one.
    for user in ["alice", "watcher", "postgres"] {
        let mut c = cluster.client_as(user);
        for sql in [
            "SHOW llmbatching.api_key",
            "SELECT current_setting('llmbatching.api_key')",
            "SET llmbatching.api_key = 'sk-stolen'",
            "ALTER ROLE alice SET llmbatching.api_key = 'sk-stolen'",
            "ALTER DATABASE postgres SET llmbatching.api_key = 'sk-x'",
            "ALTER SYSTEM SET llmbatching.api_key = 'sk-x'",
        ] {
            let message = refused(&mut c, sql);
            assert!(!message.contains(API_KEY), "{user}: {sql}: {message}");
        }
        for sql in [
            "SELECT count(*) FROM pg_settings WHERE setting LIKE '%sk-test-%'",
            "SELECT count(*) FROM pg_db_role_setting WHERE array_to_string(setconfig, ',') LIKE '%sk-%'",
        ] {
            let found: i64 = one(&mut c, sql);
            assert_eq!(found, 0, "{user}: {sql}");
        }
    }
    let mut watcher = cluster.client_as("watcher");
    let file_settings: i64 = watcher
        .query_one(
            "SELECT count(*) FROM pg_file_settings WHERE setting LIKE '%sk-test-%'",
            &[],
        )
        .map(|r| r.get(0))
        .unwrap_or(0);
    assert_eq!(file_settings, 0);

    // The worker reads the key from its file and works.
    let mut alice = cluster.client_as("alice");
    let id: i64 = one(&mut alice, "SELECT llm_submit('m', 'with a key')");
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        one::<String>(&mut alice, &format!("SELECT llm_status({id})")),
        "completed"
    );
    let activity: Vec<Option<String>> = watcher
        .query(
            "SELECT query FROM pg_stat_activity WHERE backend_type = 'llmbatching worker'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        activity.iter().flatten().all(|q| !q.contains(API_KEY)),
        "{activity:?}"
    );
    assert!(
        !cluster.log().contains(API_KEY),
        "the key is in the server log"
    );
}

#[test]
fn a_key_left_in_the_configuration_is_named_and_ignored_never_shown() {
    let cluster = Cluster::start(
        EmulatorConfig {
            api_key: Some(API_KEY.into()),
            ..quick()
        },
        &[("llmbatching.api_key", "sk-left-over-0123456789")],
    );
    cluster
        .client()
        .batch_execute("SELECT pg_reload_conf()")
        .unwrap();
    cluster.wait_for(
        "the warning about the key setting",
        Duration::from_secs(30),
        || cluster.log().contains("llmbatching.api_key is not read"),
    );
    assert!(
        !cluster.log().contains("sk-left-over-0123456789"),
        "the value of the key setting is in the log"
    );
}

#[test]
fn the_key_file_is_used_only_when_only_the_server_can_read_it() {
    let file_key = "sk-from-a-file";
    let cluster = shared_database(
        EmulatorConfig {
            api_key: Some(file_key.into()),
            ..quick()
        },
        &[("llmbatching.api_key_file", "other.key")],
    );
    cluster.write_server_file("other.key", &format!("{file_key}\n"), "600");
    let mut alice = cluster.client_as("alice");
    let id: i64 = one(&mut alice, "SELECT llm_submit('m', 'keyed by file')");
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        alice
            .query_one("SELECT llm_status($1)", &[&id])
            .unwrap()
            .get::<_, String>(0),
        "completed"
    );

    cluster.write_server_file("other.key", "", "644");
    let later: i64 = one(&mut alice, "SELECT llm_submit('m', 'refused file')");
    cluster.wait_for(
        "the warning about the file",
        Duration::from_secs(30),
        || {
            cluster
                .log()
                .contains("must not be readable by group or others")
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        alice
            .query_one("SELECT llm_status($1)", &[&later])
            .unwrap()
            .get::<_, String>(0),
        "queued"
    );
    assert!(!cluster.log().contains(file_key));
}

#[test]
fn a_same_named_function_in_a_writable_schema_does_not_reach_the_worker() {
    let cluster = shared_database(quick(), &[]);
    cluster
        .client()
        .batch_execute("GRANT CREATE ON SCHEMA public TO alice")
        .unwrap();
    let mut alice = cluster.client_as("alice");
    // Would be picked up by an unqualified make_interval(secs => ...) if public were searched.
    alice
        .batch_execute(
            "CREATE FUNCTION public.make_interval(secs double precision) RETURNS interval
                 LANGUAGE sql AS $$ SELECT interval '100 years' $$;
             CREATE FUNCTION public.pg_notify(text, text) RETURNS void LANGUAGE sql AS $$ SELECT $$;",
        )
        .unwrap();
    let ids: Vec<i64> = alice
        .query(
            "SELECT llm_submit('m', 'q' || g) FROM generate_series(1, 5) g",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    cluster.wait_until_settled(SETTLE);
    for id in ids {
        assert_eq!(
            alice
                .query_one("SELECT llm_status($1)", &[&id])
                .unwrap()
                .get::<_, String>(0),
            "completed"
        );
    }
    let far: i64 = one(
        &mut cluster.client(),
        "SELECT count(*) FROM llmbatching.batches WHERE next_check_at > now() + interval '1 year'",
    );
    assert_eq!(far, 0);
}

#[test]
fn hostile_prompts_cannot_change_another_field_of_the_batch_line() {
    let cluster = shared_database(quick(), &[]);
    let mut alice = cluster.client_as("alice");
    let megabyte: String = "ünïcödé \"quoted\" \\ back\nnew line\t😀 ".repeat(40_000);
    let prompts = [
        r#"", "custom_id": "1", "url": "/v1/evil", "x": ""#.to_string(),
        "\n{\"custom_id\":\"2\",\"method\":\"POST\",\"url\":\"/v1/responses\",\"body\":{\"model\":\"evil\"}}\n".to_string(),
        "\u{202e}right-to-left\u{200b}zero-width\u{feff}bom".to_string(),
        "}}}]]]\"\"\"".to_string(),
        megabyte,
    ];
    let mut ids = Vec::new();
    let mut tx = alice.transaction().unwrap();
    for prompt in &prompts {
        ids.push(
            tx.query_one("SELECT llm_submit('gpt-4o-mini', $1)", &[prompt])
                .unwrap()
                .get::<_, i64>(0),
        );
    }
    tx.commit().unwrap();
    cluster.wait_until_settled(SETTLE);
    for (id, prompt) in ids.iter().zip(&prompts) {
        let row = alice
            .query_one("SELECT llm_status($1), llm_result($1)", &[id])
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "completed");
        assert!(
            row.get::<_, Option<String>>(1) == Some(echo_answer("gpt-4o-mini", prompt)),
            "request {id}"
        );
    }
    let stats = cluster.emulator.stats();
    let expected: std::collections::BTreeSet<String> =
        ids.iter().map(|id| id.to_string()).collect();
    let ran: std::collections::BTreeSet<String> =
        stats.runs_per_custom_id.keys().cloned().collect();
    assert_eq!(ran, expected, "custom_ids at the provider");
    assert_eq!(
        one::<i64>(
            &mut cluster.client(),
            "SELECT count(*) FROM llmbatching.batches"
        ),
        1
    );
}
