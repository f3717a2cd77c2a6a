//! Provider faults and limits: token-limit refusals, the enqueued-token cap, the in-flight
//! limit, HTTP errors with Retry-After, refusals, cancellation, cleanup and retention.

mod common;

use common::{quick, Cluster, EmulatorConfig};
use llmbatching_emulator::Fault;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(180);

fn submit(cluster: &Cluster, n: i32) {
    cluster
        .client()
        .execute(
            "SELECT llm_submit('m', 'request number ' || g) FROM generate_series(1, $1) g",
            &[&n],
        )
        .unwrap();
}

#[test]
fn a_token_limit_refusal_queues_the_requests_again_without_using_an_attempt_and_pauses_the_model() {
    // About 12 tokens a request: one batch of 20 fits under 300, two open at once do not.
    let emulator = EmulatorConfig {
        enqueued_token_limit: Some(300),
        in_progress_ms: 300,
        ..quick()
    };
    let cluster = Cluster::start(
        emulator,
        &[
            ("llmbatching.batch_max_requests", "20"),
            ("llmbatching.max_attempts", "1"),
            ("llmbatching.token_limit_pause", "300ms"),
        ],
    );
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    submit(&cluster, 60);
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.requests WHERE state = 'completed' AND attempts = 1"
        ),
        60
    );
    let refused = cluster.count(
        "SELECT count(*) FROM llmbatching.batches
          WHERE provider_status = 'failed' AND provider_errors LIKE 'token_limit_exceeded%'",
    );
    assert!(
        refused > 0,
        "the emulator never refused a batch; the test proves nothing"
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.model_pauses WHERE model = 'm'"),
        1
    );
}

#[test]
fn the_enqueued_token_cap_keeps_batches_under_the_provider_limit() {
    let emulator = EmulatorConfig {
        enqueued_token_limit: Some(300),
        in_progress_ms: 300,
        ..quick()
    };
    let cluster = Cluster::start(
        emulator,
        &[
            ("llmbatching.batch_max_requests", "20"),
            ("llmbatching.max_enqueued_tokens", "250"),
        ],
    );
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    submit(&cluster, 60);
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        60
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.batches WHERE provider_status = 'failed'"),
        0
    );
    assert!(cluster.count("SELECT max(estimated_tokens) FROM llmbatching.batches") <= 250);

    // A per-model cap overrides the setting; a request over the whole cap fails at once.
    let mut c = cluster.client();
    c.batch_execute("INSERT INTO llmbatching.model_limits VALUES ('m', 5)")
        .unwrap();
    let id: i64 = c
        .query_one(
            "SELECT llm_submit('m', 'a prompt longer than five tokens')",
            &[],
        )
        .unwrap()
        .get(0);
    cluster.wait_until_settled(SETTLE);
    let error: String = c.query_one("SELECT llm_error($1)", &[&id]).unwrap().get(0);
    assert!(error.contains("enqueued-token cap of 5"), "{error}");
}

#[test]
fn no_more_batches_are_open_than_the_in_flight_limit() {
    let cluster = Cluster::start(
        quick(),
        &[
            ("llmbatching.batch_max_requests", "10"),
            ("llmbatching.max_batches_in_flight", "1"),
        ],
    );
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    submit(&cluster, 40);
    cluster.wait_until_settled(SETTLE);
    assert_eq!(cluster.count("SELECT count(*) FROM llmbatching.batches"), 4);
    assert_eq!(cluster.emulator.stats().max_open_batches, 1);
}

#[test]
fn server_errors_are_retried_honouring_retry_after_and_refusals_are_recorded() {
    let mut faults = std::collections::BTreeMap::new();
    let throttled = Fault {
        error_rate: 1.0,
        statuses: vec![429],
        retry_after: Some(3),
        ..Fault::default()
    };
    faults.insert("create".to_string(), throttled);
    let cluster = Cluster::start(
        EmulatorConfig { faults, ..quick() },
        &[("llmbatching.max_attempts", "1")],
    );
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    submit(&cluster, 5);
    cluster.wait_for("a throttled create", Duration::from_secs(30), || {
        c.query_one(
            "SELECT count(*) FROM llmbatching.batches WHERE last_error LIKE '%429%'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            > 0
    });
    let wait: f64 = c
        .query_one(
            "SELECT extract(epoch FROM next_check_at - now())::float8 FROM llmbatching.batches",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        wait > 2.0,
        "Retry-After: 3 was not honoured (next try in {wait:.1}s)"
    );
    cluster.emulator.configure(|c| c.faults.clear());
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        5
    );

    // A refusal that persists ends the batch; out of attempts, its requests fail with the reason.
    cluster.emulator.configure(|c| {
        let refused = Fault {
            error_rate: 1.0,
            statuses: vec![400],
            ..Fault::default()
        };
        c.faults.insert("create".into(), refused);
    });
    let id: i64 = c
        .query_one("SELECT llm_submit('m', 'refused')", &[])
        .unwrap()
        .get(0);
    cluster.wait_until_settled(SETTLE);
    // The request, which may share its batch with other roles' requests, gets a neutral reason;
    // the provider's words stay with the batch, for administrators.
    let error: String = c.query_one("SELECT llm_error($1)", &[&id]).unwrap().get(0);
    assert!(
        error.contains("the provider refused this request's batch")
            && error.contains("gave up after 1 attempts"),
        "{error}"
    );
    let last_error: String = c
        .query_one(
            "SELECT b.last_error FROM llmbatching.batches b JOIN llmbatching.requests r ON r.batch_id = b.id WHERE r.id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert!(
        last_error.contains("batch creation failed: HTTP 400: Emulated fault on create"),
        "{last_error}"
    );
}

#[test]
fn cancelling_every_request_of_a_submitted_batch_cancels_it_at_the_provider() {
    let cluster = Cluster::start(
        EmulatorConfig {
            in_progress_ms: 4000,
            ..quick()
        },
        &[],
    );
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    submit(&cluster, 10);
    cluster.wait_for_a_submitted_batch();
    let cancelled: i64 = c
        .query_one(
            "SELECT count(*) FROM llmbatching.requests WHERE llm_cancel(id)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(cancelled, 10);
    cluster.wait_for("the batch to be cancelled", SETTLE, || {
        c.query_one(
            "SELECT state = 'done' AND provider_status = 'cancelled' FROM llmbatching.batches",
            &[],
        )
        .unwrap()
        .get::<_, bool>(0)
    });
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.batches WHERE cancel_sent_at IS NOT NULL"),
        1
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'cancelled' AND response IS NULL"),
        10
    );
    cluster.wait_for("the cancelled batch to be closed", Duration::from_secs(60), || {
        cluster.count("SELECT count(*) FROM llmbatching.batches WHERE state = 'done' AND cancelled_count = 10") == 1
    });

    // Cancelling part of a batch leaves the batch running; that answer is ignored.
    let ids: Vec<i64> = c
        .query(
            "SELECT llm_submit('m', 'second ' || g) FROM generate_series(1, 5) g",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    cluster.wait_for_a_submitted_batch();
    assert!(c
        .query_one("SELECT llm_cancel($1)", &[&ids[0]])
        .unwrap()
        .get::<_, bool>(0));
    cluster.wait_until_settled(SETTLE);
    let row = c
        .query_one(
            "SELECT llm_status($1), llm_result($1), (SELECT provider_status FROM llmbatching.batches ORDER BY id DESC LIMIT 1)",
            &[&ids[0]],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "cancelled");
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert_eq!(row.get::<_, String>(2), "completed");
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        4
    );
}

#[test]
fn provider_files_are_deleted_once_read_unless_kept() {
    let cluster = Cluster::start(quick(), &[]);
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    submit(&cluster, 5);
    cluster.wait_until_settled(SETTLE);
    cluster.wait_for("the files to be deleted", Duration::from_secs(10), || {
        cluster.count("SELECT count(*) FROM llmbatching.batches WHERE files_deleted_at IS NOT NULL")
            == 1
    });
    assert_eq!(
        cluster.emulator.stats().files_deleted,
        2,
        "input and output file"
    );

    cluster.set(&[("llmbatching.delete_provider_files", "off")]);
    std::thread::sleep(Duration::from_millis(300));
    submit(&cluster, 5);
    cluster.wait_until_settled(SETTLE);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cluster.emulator.stats().files_deleted, 2);
}

#[test]
fn retention_removes_finished_rows_once_they_are_old_enough() {
    let cluster = Cluster::start(quick(), &[("llmbatching.retention", "2s")]);
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    submit(&cluster, 5);
    cluster.wait_until_settled(SETTLE);
    // A write-back goes with its request; a request that finished without a batch goes too.
    cluster.set(&[("llmbatching.batch_wait", "1h")]);
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, a text); INSERT INTO t VALUES (1);
         SELECT llm_write_back(r.id, 't', 'a', '{\"id\": 1}') FROM llmbatching.requests r WHERE r.state = 'completed' LIMIT 1;
         SELECT llm_cancel(llm_submit('m', 'cancelled while queued'));
         SELECT llm_submit('m', 'waits');",
    )
    .unwrap();
    cluster.wait_for("the purge", Duration::from_secs(30), || {
        cluster.count(
            "SELECT count(*) FROM llmbatching.requests WHERE state IN ('completed', 'cancelled')",
        ) == 0
            && cluster.count("SELECT count(*) FROM llmbatching.batches") == 0
            && cluster.count("SELECT count(*) FROM llmbatching.writebacks") == 0
    });
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'queued'"),
        1,
        "open work is kept"
    );
}

#[test]
fn a_batch_whose_create_answer_was_lost_is_found_again_not_created_twice() {
    let mut faults = std::collections::BTreeMap::new();
    faults.insert(
        "create".to_string(),
        Fault {
            drop_rate: 1.0,
            ..Fault::default()
        },
    );
    let cluster = Cluster::start(EmulatorConfig { faults, ..quick() }, &[]);
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    submit(&cluster, 5);
    // Every create answer is lost, so only finding the batch again can complete the work.
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        5
    );
    assert_eq!(
        cluster.emulator.stats().batches_created,
        1,
        "the batch was created twice"
    );
    assert!(cluster
        .log()
        .contains("was already created at the provider"));
}

#[test]
fn a_batch_that_lingers_in_validating_and_finalizing_is_polled_until_it_ends() {
    let lingering = EmulatorConfig {
        validating_ms: 1500,
        in_progress_ms: 200,
        finalizing_ms: 1500,
        ..quick()
    };
    let cluster = Cluster::start(lingering, &[]);
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    submit(&cluster, 3);
    let mut seen = std::collections::BTreeSet::new();
    cluster.wait_for("the batch to complete", SETTLE, || {
        let status: Option<String> = c
            .query_opt("SELECT provider_status FROM llmbatching.batches", &[])
            .unwrap()
            .and_then(|r| r.get(0));
        seen.extend(status.clone());
        status.as_deref() == Some("completed")
    });
    assert!(
        seen.contains("validating") && seen.contains("finalizing"),
        "{seen:?}"
    );
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        3
    );
}

fn pid_of(cluster: &Cluster, backend_type: &str) -> Option<i32> {
    cluster
        .client()
        .query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = $1",
            &[&backend_type],
        )
        .unwrap()
        .map(|r| r.get(0))
}

fn wait_for_new_pid(cluster: &Cluster, backend_type: &str, old: i32) -> i32 {
    let mut new = None;
    cluster.wait_for(
        &format!("a new {backend_type}"),
        Duration::from_secs(30),
        || {
            new = pid_of(cluster, backend_type).filter(|p| *p != old);
            new.is_some()
        },
    );
    new.unwrap()
}

#[test]
fn a_terminated_worker_or_launcher_comes_back() {
    let cluster = Cluster::with_extension(&[]);
    for backend_type in ["llmbatching worker", "llmbatching launcher"] {
        cluster.worker_pid();
        let old = pid_of(&cluster, backend_type).expect(backend_type);
        let terminated: bool = cluster
            .client()
            .query_one("SELECT pg_terminate_backend($1)", &[&old])
            .unwrap()
            .get(0);
        assert!(terminated);
        wait_for_new_pid(&cluster, backend_type, old);
        submit(&cluster, 5);
        cluster.wait_until_settled(SETTLE);
    }
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        10
    );
}

#[test]
fn a_stalled_download_holds_up_no_other_batch_and_never_the_worker_s_stop() {
    // A silent transfer is given up only after ten minutes; everything below happens meanwhile.
    let cluster = Cluster::start(quick(), &[("llmbatching.transfer_idle_timeout", "10min")]);
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    cluster.emulator.configure(|c| {
        c.faults.insert(
            "content".into(),
            Fault {
                stall_next: 1,
                ..Fault::default()
            },
        );
    });
    let mut c = cluster.client();
    c.batch_execute("SELECT llm_submit('stalled-model', 'a ' || g) FROM generate_series(1, 5) g")
        .unwrap();
    cluster.wait_for("a download to stall", SETTLE, || {
        cluster.emulator.stats().faults_injected > 0
    });
    // Other batches are claimed, uploaded, created, polled and read back beside the stall.
    c.batch_execute("SELECT llm_submit('other-model', 'b ' || g) FROM generate_series(1, 5) g")
        .unwrap();
    cluster.wait_for("the other model's answers", SETTLE, || {
        cluster.count(
            "SELECT count(*) FROM llmbatching.requests WHERE model = 'other-model' AND state = 'completed'",
        ) == 5
    });
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.requests WHERE model = 'stalled-model' AND state = 'completed'"
        ),
        0,
        "the stalled download is still under way"
    );
    let activity: String = c
        .query_one(
            "SELECT query FROM pg_stat_activity WHERE backend_type = 'llmbatching worker'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(activity.contains("download"), "{activity}");

    // The worker stuck beside a silent download still stops at once when told to, and the
    // worker started again reads the batch back.
    let worker = cluster.worker_pid();
    let started = std::time::Instant::now();
    cluster
        .client()
        .execute("SELECT pg_terminate_backend($1)", &[&worker])
        .unwrap();
    cluster.wait_for("the worker to exit", Duration::from_secs(5), || {
        pid_of(&cluster, "llmbatching worker") != Some(worker)
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        10
    );
    let stats = cluster.emulator.stats();
    assert!(
        stats.ran_more_than_once().is_empty(),
        "{:?}",
        stats.ran_more_than_once()
    );
}

#[test]
fn answers_the_provider_has_are_collected_not_paid_for_again() {
    for (late_polls, outage_ms, html) in [(3, 0, false), (0, 4000, false), (0, 4000, true)] {
        let cluster = Cluster::start(
            EmulatorConfig {
                late_output_polls: late_polls,
                content_outage_ms: outage_ms,
                content_outage_html: html,
                ..quick()
            },
            &[],
        );
        cluster
            .client()
            .batch_execute("CREATE EXTENSION llmbatching")
            .unwrap();
        submit(&cluster, 20);
        cluster.wait_until_settled(SETTLE);
        let case = format!("late polls {late_polls}, outage {outage_ms} ms, html {html}");
        assert_eq!(
            cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed' AND attempts = 1"),
            20,
            "{case}"
        );
        let stats = cluster.emulator.stats();
        assert!(stats.faults_injected > 0, "{case}: no fault was injected");
        assert_eq!(stats.batches_created, 1, "{case}: sent again");
        assert!(stats.ran_more_than_once().is_empty(), "{case}");
    }
}

#[test]
fn a_batch_stuck_past_its_deadline_is_cancelled_and_its_answers_kept() {
    let cluster = Cluster::start(
        EmulatorConfig {
            finalizing_ms: 3_600_000,
            ..quick()
        },
        &[("llmbatching.batch_deadline", "3s")],
    );
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    submit(&cluster, 10);
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.requests WHERE state = 'completed' AND attempts = 1"
        ),
        10,
        "the answers that had arrived were not kept"
    );
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.batches
              WHERE cancel_sent_at IS NOT NULL AND provider_status = 'cancelled' AND state = 'done'"
        ),
        1
    );
    assert_eq!(cluster.emulator.stats().batches_created, 1);
}

#[test]
fn a_newer_request_for_a_row_supersedes_an_older_one() {
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1h")]);
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut c = cluster.client_with_notices(notices.clone());
    c.batch_execute(
        "CREATE TABLE notes (id int PRIMARY KEY, body text, summary text);
         INSERT INTO notes VALUES (1, 'one', NULL), (2, 'two', NULL);
         CREATE TABLE early AS SELECT llm_submit('m', 'Early: one') AS id;
         SELECT * FROM llm_classify('notes', 'summary', $$'First: ' || body$$, 'm');
         SELECT * FROM llm_classify('notes', 'summary', $$'Second: ' || body$$, 'm');",
    )
    .unwrap();
    // A request older than the row's newest, registered after it, is superseded at once.
    c.batch_execute("SELECT llm_write_back(id, 'notes', 'summary', '{\"id\": 1}') FROM early")
        .unwrap();
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.writebacks w JOIN early e ON e.id = w.request_id
              WHERE w.outcome = 'superseded' AND w.written_at IS NOT NULL"
        ),
        1
    );
    assert!(
        notices
            .lock()
            .unwrap()
            .iter()
            .any(|n| n.contains("supersede")),
        "{:?}",
        notices.lock().unwrap()
    );
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    cluster.wait_until_settled(SETTLE);
    cluster.wait_for("the write-backs to settle", SETTLE, || {
        cluster.count("SELECT count(*) FROM llmbatching.writebacks WHERE written_at IS NULL") == 0
    });
    let summaries: Vec<String> = c
        .query("SELECT summary FROM notes ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(summaries, ["[m] Second: one", "[m] Second: two"]);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.writebacks WHERE outcome = 'superseded'"),
        3
    );
}

#[test]
fn dropping_the_extension_with_batches_open_is_refused_with_the_way_out() {
    let cluster = Cluster::start(
        EmulatorConfig {
            in_progress_ms: 60_000,
            ..quick()
        },
        &[],
    );
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    let worker = cluster.worker_pid();
    submit(&cluster, 3);
    cluster.wait_for_a_submitted_batch();
    let err = c
        .batch_execute("DROP EXTENSION llmbatching")
        .expect_err("dropped with a batch open");
    let db = err.as_db_error().unwrap();
    assert!(
        db.message().contains("batches open at the provider"),
        "{}",
        db.message()
    );
    assert!(db.hint().unwrap_or_default().contains("llm_cancel"));
    // Dropping its schema would drop it too.
    let err = c
        .batch_execute("DROP SCHEMA llmbatching CASCADE")
        .expect_err("schema dropped with a batch open");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("batches open at the provider"));
    // Other extensions are none of its business.
    c.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS plpgsql; DROP EXTENSION IF EXISTS no_such_extension",
    )
    .unwrap();
    c.batch_execute(
        "ALTER EVENT TRIGGER llmbatching_drop_guard DISABLE; DROP EXTENSION llmbatching",
    )
    .unwrap();
    // The worker stops cleanly (what its transfers bring has nowhere to go), and CREATE
    // EXTENSION starts one again.
    cluster.wait_for("the worker to stop", SETTLE, || {
        cluster.count(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'llmbatching worker'",
        ) == 0
    });
    assert!(cluster
        .log()
        .contains("llmbatching worker stopped: the extension is not installed in this database"));
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    assert_ne!(cluster.worker_pid(), worker);
    submit(&cluster, 2);
    cluster.emulator.configure(|e| e.in_progress_ms = 100);
    cluster.wait_until_settled(SETTLE);
}

#[test]
fn an_administrator_may_give_up_on_result_files_after_seeing_the_cost() {
    let cluster = Cluster::start(
        EmulatorConfig {
            content_outage_ms: 3_600_000,
            ..quick()
        },
        &[],
    );
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    submit(&cluster, 4);
    cluster.wait_for("the batch to wait for its files", SETTLE, || {
        cluster.count("SELECT count(*) FROM llmbatching.batches WHERE state = 'ingesting' AND step_failures > 0") == 1
    });
    // Nothing is sent again while the window lasts.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster.emulator.stats().batches_created, 1);
    let batch: i64 = c
        .query_one("SELECT id FROM llmbatching.batches", &[])
        .unwrap()
        .get(0);
    let row = c
        .query_one("SELECT * FROM llm_give_up_results($1)", &[&batch])
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 4, "requests that would be sent again");
    assert!(!row.get::<_, bool>(3), "given up without confirm");
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.batches WHERE results_given_up_at IS NOT NULL"
        ),
        0
    );
    cluster.emulator.configure(|e| e.content_outage_ms = 0);
    // The outage ends; giving up is no longer needed, but said: what the files settle is kept,
    // the rest sent again.
    c.query_one(
        "SELECT * FROM llm_give_up_results($1, confirm => true)",
        &[&batch],
    )
    .unwrap();
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        4
    );
}

#[test]
fn contradicting_result_files_are_read_the_same_way_whatever_their_order() {
    let cluster = Cluster::start(
        EmulatorConfig {
            noisy_results: true,
            ..quick()
        },
        &[],
    );
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    submit(&cluster, 30);
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.requests WHERE state = 'completed' AND attempts = 1"
        ),
        30,
        "a contradicting error line sent a request again"
    );
    let stats = cluster.emulator.stats();
    assert!(stats.faults_injected > 0);
    assert_eq!(stats.batches_created, 1);
    assert!(
        stats.ran_more_than_once().is_empty(),
        "{:?}",
        stats.ran_more_than_once()
    );
    assert!(cluster
        .log()
        .contains("repeated a request already answered"));
}
