//! End-to-end: a real cluster with the worker running, the emulator as the provider.

mod common;

use common::{quick, Cluster, EmulatorConfig};
use llmbatching_emulator::answers::{
    echo_answer, failure_message, FAIL_MARKER, GARBLE_MARKER, TRUNCATE_MARKER,
};
use std::collections::HashMap;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(180);

#[test]
fn a_thousand_requests_over_two_models_and_two_endpoints_all_get_their_own_answer() {
    let cluster = Cluster::start(quick(), &[("llmbatching.batch_max_requests", "200")]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE EXTENSION llmbatching;
         CREATE TABLE reviews (id int PRIMARY KEY, body text, request_id bigint);
         INSERT INTO reviews SELECT g, 'review number ' || g FROM generate_series(1, 1000) g;
         UPDATE reviews SET request_id = CASE id % 4
             WHEN 0 THEN llm_submit('model-a', body)
             WHEN 1 THEN llm_submit('model-b', body, 'Answer in one word')
             WHEN 2 THEN llm_submit('model-a', body, endpoint => '/v1/chat/completions')
             ELSE llm_submit('model-b', body, 'Be terse', '{\"temperature\": 0}', '/v1/chat/completions') END;",
    )
    .unwrap();
    cluster.wait_until_settled(SETTLE);

    let rows = c
        .query("SELECT r.id, r.body, llm_status(r.request_id), llm_result(r.request_id) FROM reviews r", &[])
        .unwrap();
    assert_eq!(rows.len(), 1000);
    for row in rows {
        let (id, body): (i32, String) = (row.get(0), row.get(1));
        let model = if id % 2 == 0 { "model-a" } else { "model-b" };
        assert_eq!(
            row.get::<_, Option<String>>(2).as_deref(),
            Some("completed"),
            "review {id}"
        );
        assert_eq!(
            row.get::<_, Option<String>>(3),
            Some(echo_answer(model, &body)),
            "review {id}"
        );
    }
    // 250 requests per (endpoint, model) with at most 200 per batch: two batches each.
    let per_group: Vec<(String, String, i64)> = c
        .query(
            "SELECT endpoint, model, count(*) FROM llmbatching.batches GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(per_group.len(), 4);
    assert!(per_group.iter().all(|(_, _, n)| *n == 2), "{per_group:?}");
    let unfinished: i64 = c
        .query_one(
            "SELECT count(*) FROM llmbatching.batches
              WHERE state <> 'done' OR provider_status <> 'completed' OR provider_batch_id IS NULL
                 OR input_file_id IS NULL OR output_file_id IS NULL OR completed_count <> request_count",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unfinished, 0);
    let tokens: i64 = c
        .query_one("SELECT count(*) FROM llmbatching.requests WHERE input_tokens > 0 AND output_tokens > 0", &[])
        .unwrap()
        .get(0);
    assert_eq!(tokens, 1000);
    assert!(cluster.emulator.stats().ran_more_than_once().is_empty());
}

#[test]
fn failing_lines_leave_exactly_those_requests_failed_with_the_provider_message() {
    let cluster = Cluster::start(quick(), &[]);
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    let mut ids = HashMap::new();
    for i in 0..20 {
        let prompt = if i % 4 == 0 {
            format!("item {i} {FAIL_MARKER}")
        } else {
            format!("item {i}")
        };
        let id: i64 = c
            .query_one("SELECT llm_submit('m', $1)", &[&prompt])
            .unwrap()
            .get(0);
        ids.insert(id, i % 4 == 0);
    }
    cluster.wait_until_settled(SETTLE);
    for (id, should_fail) in ids {
        let row = c
            .query_one(
                "SELECT llm_status($1), llm_error($1), llm_result($1)",
                &[&id],
            )
            .unwrap();
        let (status, error, result): (String, Option<String>, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        if should_fail {
            assert_eq!(status, "failed");
            assert_eq!(error, Some(failure_message(&id.to_string())));
            assert_eq!(result, None);
        } else {
            assert_eq!(status, "completed");
            assert_eq!(error, None);
        }
    }
}

#[test]
fn a_batch_where_every_line_fails_has_only_an_error_file_and_is_handled() {
    let cluster = Cluster::start(
        EmulatorConfig {
            empty_error_file_id_as_string: true,
            ..quick()
        },
        &[],
    );
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    c.batch_execute(&format!(
        "SELECT llm_submit('m', 'x{FAIL_MARKER}' || g) FROM generate_series(1, 5) g"
    ))
    .unwrap();
    cluster.wait_until_settled(SETTLE);
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'failed'), count(*) FROM llmbatching.requests",
            &[],
        )
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (5, 5));
    let batch = c
        .query_one(
            "SELECT provider_status, output_file_id, error_file_id FROM llmbatching.batches",
            &[],
        )
        .unwrap();
    assert_eq!(batch.get::<_, String>(0), "completed");
    assert_eq!(batch.get::<_, Option<String>>(1), None);
    assert!(batch.get::<_, Option<String>>(2).is_some());

    // A clean batch that reports its missing error file as "" completes as well.
    c.batch_execute("SELECT llm_submit('m', 'fine ' || g) FROM generate_series(1, 5) g")
        .unwrap();
    cluster.wait_until_settled(SETTLE);
    let completed: i64 = c
        .query_one(
            "SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(completed, 5);
}

#[test]
fn an_expired_batch_sends_the_unfinished_requests_again_and_they_complete() {
    let cluster = Cluster::start(
        EmulatorConfig {
            expire_next: 1,
            expire_fraction: 0.5,
            ..quick()
        },
        &[],
    );
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching; SELECT llm_submit('m', 'question ' || g) FROM generate_series(1, 40) g")
        .unwrap();
    cluster.wait_until_settled(SETTLE);
    let statuses: Vec<String> = c
        .query(
            "SELECT provider_status FROM llmbatching.batches ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["expired", "completed"]);
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'completed'),
                    count(*) FILTER (WHERE attempts = 2),
                    count(*) FILTER (WHERE result_text = '[m] ' || (body->>'input'))
               FROM llmbatching.requests",
            &[],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        ),
        (40, 20, 40)
    );
    let stats = cluster.emulator.stats();
    assert!(stats.ran_more_than_once().is_empty());
    assert_eq!(stats.runs_per_custom_id.len(), 40);
}

#[test]
fn restarting_the_worker_and_the_server_mid_batch_loses_nothing() {
    let slow = EmulatorConfig {
        validating_ms: 200,
        in_progress_ms: 3000,
        finalizing_ms: 200,
        ..quick()
    };
    let cluster = Cluster::start(slow, &[("llmbatching.batch_max_requests", "50")]);
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching; SELECT llm_submit('m', 'row ' || g) FROM generate_series(1, 200) g")
        .unwrap();
    cluster.wait_for_a_submitted_batch();
    // The worker dies hard: the postmaster resets every backend and starts it again.
    let pid = cluster.worker_pid();
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_ne!(cluster.worker_pid(), pid);
    // Then the whole server stops without a checkpoint and comes back.
    cluster.restart("immediate");
    c = cluster.client();
    c.batch_execute("SELECT llm_submit('m', 'late ' || g) FROM generate_series(1, 20) g")
        .unwrap();
    cluster.wait_until_settled(SETTLE);

    let row = c
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE state = 'completed' AND result_text = '[m] ' || (body->>'input'))
               FROM llmbatching.requests",
            &[],
        )
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (220, 220));
    let batches: i64 = c
        .query_one("SELECT count(*) FROM llmbatching.batches", &[])
        .unwrap()
        .get(0);
    let stats = cluster.emulator.stats();
    assert_eq!(
        stats.batches_created, batches as u64,
        "a batch was created twice"
    );
    assert!(
        stats.ran_more_than_once().is_empty(),
        "requests ran twice: {:?}",
        stats.ran_more_than_once()
    );
}

#[test]
fn the_worker_wakes_on_submit_and_reloads_settings_on_sighup() {
    // Long timers: only a wake-up or a reload can make the worker act quickly.
    let cluster = Cluster::start(
        quick(),
        &[
            ("llmbatching.batch_wait", "1h"),
            ("llmbatching.poll_interval", "1h"),
        ],
    );
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    cluster.worker_pid();
    let workers: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'llmbatching worker'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(workers, 1, "the worker shows in pg_stat_activity");
    let first: i64 = c
        .query_one("SELECT llm_submit('m', 'first')", &[])
        .unwrap()
        .get(0);
    std::thread::sleep(Duration::from_secs(1));
    let status: String = c
        .query_one("SELECT llm_status($1)", &[&first])
        .unwrap()
        .get(0);
    assert_eq!(status, "queued", "batch_wait of 1h holds the request");

    cluster.set(&[("llmbatching.batch_wait", "0")]);
    cluster.wait_for(
        "the reloaded batch_wait to send the request",
        Duration::from_secs(30),
        || {
            c.query_one("SELECT llm_status($1)", &[&first])
                .unwrap()
                .get::<_, String>(0)
                == "submitted"
        },
    );
    let second: i64 = c
        .query_one("SELECT llm_submit('m', 'second')", &[])
        .unwrap()
        .get(0);
    cluster.wait_for(
        "the submit to wake the worker",
        Duration::from_secs(10),
        || {
            c.query_one("SELECT llm_status($1)", &[&second])
                .unwrap()
                .get::<_, String>(0)
                == "submitted"
        },
    );
}

#[test]
fn cancelled_requests_are_never_sent() {
    let cluster = Cluster::start(quick(), &[("llmbatching.batch_wait", "2s")]);
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    let keep: i64 = c
        .query_one("SELECT llm_submit('m', 'keep')", &[])
        .unwrap()
        .get(0);
    let drop: i64 = c
        .query_one("SELECT llm_submit('m', 'drop')", &[])
        .unwrap()
        .get(0);
    assert!(c
        .query_one("SELECT llm_cancel($1)", &[&drop])
        .unwrap()
        .get::<_, bool>(0));
    cluster.wait_until_settled(SETTLE);
    let statuses: Vec<String> = c
        .query(
            "SELECT llm_status($1) UNION ALL SELECT llm_status($2)",
            &[&keep, &drop],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(statuses, ["completed", "cancelled"]);
    assert!(!cluster
        .emulator
        .stats()
        .runs_per_custom_id
        .contains_key(&drop.to_string()));
}

#[test]
fn embeddings_and_whole_bodies_round_trip() {
    let cluster = Cluster::start(quick(), &[]);
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    let emb: i64 = c
        .query_one(
            "SELECT llm_submit('text-embedding-3-small', 'hello', endpoint => '/v1/embeddings')",
            &[],
        )
        .unwrap()
        .get(0);
    let raw: i64 = c
        .query_one(
            "SELECT llm_submit_body('{\"model\": \"m\", \"input\": [{\"role\": \"user\", \"content\": \"from a body\"}]}')",
            &[],
        )
        .unwrap()
        .get(0);
    cluster.wait_until_settled(SETTLE);
    let dims: i32 = c
        .query_one(
            "SELECT jsonb_array_length(llm_result_json($1)->'data'->0->'embedding')",
            &[&emb],
        )
        .unwrap()
        .get(0);
    assert_eq!(dims, 8);
    let answer: String = c
        .query_one("SELECT llm_result($1)", &[&raw])
        .unwrap()
        .get(0);
    assert_eq!(answer, "[m] from a body");
}

#[test]
fn malformed_provider_responses_never_crash_the_worker_and_the_requests_record_the_error() {
    let cluster = Cluster::start(
        EmulatorConfig {
            malformed_polls: 3,
            ..quick()
        },
        // A line cut short is read again while the window after the batch lasts; then the
        // request it cut off is sent again.
        &[
            ("llmbatching.max_attempts", "2"),
            ("llmbatching.result_retry_window", "2s"),
        ],
    );
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    let worker = cluster.worker_pid();
    let ok: i64 = c
        .query_one("SELECT llm_submit('m', 'fine')", &[])
        .unwrap()
        .get(0);
    let garbled: i64 = c
        .query_one(
            "SELECT llm_submit('m', $1)",
            &[&format!("a {GARBLE_MARKER}")],
        )
        .unwrap()
        .get(0);
    let truncated: i64 = c
        .query_one(
            "SELECT llm_submit('m', $1)",
            &[&format!("b {TRUNCATE_MARKER}")],
        )
        .unwrap()
        .get(0);
    cluster.wait_until_settled(SETTLE);

    let answer: String = c.query_one("SELECT llm_result($1)", &[&ok]).unwrap().get(0);
    assert_eq!(answer, "[m] fine");
    let status_and_error = |c: &mut postgres::Client, id: i64| -> (String, String) {
        let row = c
            .query_one("SELECT llm_status($1), coalesce(llm_error($1), '')", &[&id])
            .unwrap();
        (row.get(0), row.get(1))
    };
    // A line that names its request but cannot be read, read again and still unreadable: the
    // request ran, so it fails with the line kept, and is not paid for again.
    let (status, error) = status_and_error(&mut c, garbled);
    assert_eq!(status, "failed");
    assert!(
        error.contains("malformed result line") && error.contains("not sent again"),
        "{error}"
    );
    let kept: bool = c
        .query_one(
            "SELECT response->>'custom_id' = id::text FROM llmbatching.requests WHERE id = $1",
            &[&garbled],
        )
        .unwrap()
        .get(0);
    assert!(kept, "the unreadable line is not kept");
    assert_eq!(
        cluster
            .emulator
            .stats()
            .runs_per_custom_id
            .get(&garbled.to_string()),
        Some(&1),
        "the request whose line was unreadable was sent again"
    );
    let (status, error) = status_and_error(&mut c, truncated);
    assert_eq!(status, "failed");
    assert!(
        error.contains("no result for this request") && error.contains("gave up after 2 attempts"),
        "{error}"
    );
    assert_eq!(cluster.worker_pid(), worker, "the worker restarted");
    assert!(
        cluster.log().contains("malformed provider response"),
        "the malformed polls were not seen"
    );
}

#[test]
fn the_worker_stops_cleanly_on_sigterm_and_picks_up_after_a_restart() {
    let cluster = Cluster::start(
        EmulatorConfig {
            in_progress_ms: 2000,
            ..quick()
        },
        &[],
    );
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching; SELECT llm_submit('m', 'q' || g) FROM generate_series(1, 30) g")
        .unwrap();
    cluster.wait_for_a_submitted_batch();
    cluster.restart("fast");
    assert!(
        cluster.log().contains("llmbatching worker stopped"),
        "no clean stop in the log"
    );
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        30
    );
    assert_eq!(cluster.emulator.stats().batches_created, 1);
}

#[test]
fn the_worker_waits_for_its_database_to_be_created() {
    let cluster = Cluster::start(quick(), &[("llmbatching.database", "later")]);
    // The launcher waits without a worker restarting every few seconds.
    std::thread::sleep(Duration::from_secs(7));
    let log = cluster.log();
    assert!(
        log.contains("database \"later\" does not exist; the worker starts once it is created"),
        "the launcher did not say why no worker runs"
    );
    assert!(
        !log.contains("FATAL"),
        "something failed hard meanwhile:\n{log}"
    );
    cluster
        .client()
        .batch_execute("CREATE DATABASE later")
        .unwrap();
    let mut later = postgres::Config::new()
        .host("127.0.0.1")
        .port(cluster.port)
        .user("postgres")
        .dbname("later")
        .connect(postgres::NoTls)
        .unwrap();
    later
        .batch_execute(
            "CREATE EXTENSION llmbatching;
             SELECT llmbatching.llm_submit('m', 'late ' || g) FROM generate_series(1, 3) g;",
        )
        .unwrap();
    cluster.wait_for(
        "the requests in the new database to complete",
        SETTLE,
        || {
            later
                .query_one(
                    "SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'",
                    &[],
                )
                .map(|r| r.get::<_, i64>(0) == 3)
                .unwrap_or(false)
        },
    );
}
