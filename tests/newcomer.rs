//! The first hour: the mistakes a newcomer makes, each met with an answer that says what to do.

mod common;

use common::{quick, Cluster};
use postgres::Client;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(120);

fn error_of(c: &mut Client, sql: &str) -> (String, String) {
    let err = c.batch_execute(sql).expect_err(sql);
    let db = err.as_db_error().expect("a database error");
    (
        db.message().to_owned(),
        db.hint().unwrap_or_default().to_owned(),
    )
}

/// A client whose NOTICEs and WARNINGs are collected.
fn listening_client(cluster: &Cluster) -> (Client, Arc<Mutex<Vec<String>>>) {
    let notices = Arc::new(Mutex::new(Vec::new()));
    (cluster.client_with_notices(notices.clone()), notices)
}

#[test]
fn a_database_no_worker_serves_is_named_at_submit_and_while_waiting() {
    // Without preloading, CREATE EXTENSION starts the worker; after a server restart none runs
    // until an administrator starts it again.
    let cluster = Cluster::start(quick(), &[("shared_preload_libraries", "")]);
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    cluster.restart("fast");
    let (mut c, notices) = listening_client(&cluster);
    let id: i64 = c
        .query_one("SELECT llm_submit('m', 'anyone there?')", &[])
        .unwrap()
        .get(0);
    let warned = |notices: &Arc<Mutex<Vec<String>>>| {
        notices
            .lock()
            .unwrap()
            .iter()
            .filter(|n| n.contains("no llmbatching worker") && n.contains("llm_worker_start()"))
            .count()
    };
    assert_eq!(warned(&notices), 1, "{:?}", notices.lock().unwrap());
    // Once per session, not once per row.
    c.batch_execute("SELECT llm_submit('m', 'more ' || g) FROM generate_series(1, 5) g")
        .unwrap();
    assert_eq!(warned(&notices), 1);
    let finished: bool = c
        .query_one(
            "SELECT llm_wait(ARRAY[$1::bigint], timeout => '1 second')",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert!(!finished);
    assert!(
        warned(&notices) >= 2,
        "llm_wait did not say why nothing moves: {:?}",
        notices.lock().unwrap()
    );
    // What the warning says to do works.
    let pid: Option<i32> = c
        .query_one("SELECT llmbatching.llm_worker_start()", &[])
        .unwrap()
        .get(0);
    assert!(pid.is_some());
    cluster.wait_until_settled(Duration::from_secs(60));
}

#[test]
fn classify_arguments_that_are_not_sql_get_an_answer_about_the_argument() {
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE TABLE reviews (id int PRIMARY KEY, body text, sentiment text);
         INSERT INTO reviews VALUES (1, 'great', NULL);",
    )
    .unwrap();
    let (message, hint) = error_of(
        &mut c,
        "SELECT * FROM llm_classify('reviews', 'sentiment', prompt => 'Classify the sentiment of this review', model => 'm')",
    );
    assert!(
        message.starts_with("invalid argument \"prompt\""),
        "{message}"
    );
    assert!(
        hint.contains("SQL expression") && hint.contains("|| body"),
        "{hint}"
    );
    assert!(!message.contains("WITH p AS") && !hint.contains("WITH p AS"));
    let (message, hint) = error_of(
        &mut c,
        "SELECT * FROM llm_classify('reviews', 'sentiment', $$'Classify: ' || body$$, 'm', filter => 'sentiment is missing')",
    );
    assert!(
        message.starts_with("invalid argument \"filter\""),
        "{message}"
    );
    assert!(hint.contains("sentiment IS NULL"), "{hint}");
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests"),
        0
    );
}

#[test]
fn unknown_jobs_and_requests_are_errors_not_silence() {
    let cluster = Cluster::with_extension(&[]);
    let mut c = cluster.client();
    let (message, _) = error_of(&mut c, "SELECT llm_wait(job => 'nope')");
    assert!(message.contains("invalid argument \"job\""), "{message}");
    let (message, _) = error_of(&mut c, "SELECT * FROM llm_job_status('nope')");
    assert!(message.contains("invalid argument \"job\""), "{message}");
    let (message, _) = error_of(&mut c, "SELECT llm_wait(ARRAY[424242::bigint])");
    assert!(message.contains("invalid argument \"ids\""), "{message}");

    // Options given where instructions go.
    let (message, hint) = error_of(
        &mut c,
        "SELECT llm_submit('gpt-4o-mini', 'hi', '{\"temperature\": 0}')",
    );
    assert!(
        message.contains("invalid argument \"instructions\""),
        "{message}"
    );
    assert!(
        message.contains("options =>") || hint.contains("options =>"),
        "{message} / {hint}"
    );

    // An embedding asked of a request that is not one.
    let id: i64 = c
        .query_one("SELECT llm_submit('m', 'plain text')", &[])
        .unwrap()
        .get(0);
    cluster.wait_until_settled(SETTLE);
    let (message, _) = error_of(&mut c, &format!("SELECT llm_embedding({id})"));
    assert!(
        message.contains("invalid argument \"id\"") && message.contains("not an embedding"),
        "{message}"
    );
}

#[test]
fn a_job_whose_answers_could_not_be_written_says_so() {
    let cluster = Cluster::with_extension(&[]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE TABLE scores (id int PRIMARY KEY, body text, score int);
         INSERT INTO scores SELECT g, 'row ' || g FROM generate_series(1, 3) g;
         SELECT * FROM llm_classify('scores', 'score', $$'Score: ' || body$$, 'm', job => 'scores');",
    )
    .unwrap();
    assert!(c
        .query_one("SELECT llm_wait(job => 'scores')", &[])
        .unwrap()
        .get::<_, bool>(0));
    let row = c
        .query_one(
            "SELECT completed, write_backs, written, not_written, not_written_reasons
               FROM llm_job_status('scores')",
            &[],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3)
        ),
        (3, 3, 0, 3)
    );
    let reasons: Vec<String> = row.get(4);
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("invalid input syntax for type integer")),
        "{reasons:?}"
    );
}

#[test]
fn models_are_priced_by_their_own_row_or_their_dated_snapshot_only() {
    let cluster = Cluster::with_extension(&[]);
    let mut c = cluster.client();
    c.batch_execute(
        "SELECT llm_submit('gpt-4o-mini-2024-07-18', 'dated');
         SELECT llm_submit('gpt-4o-mnii', 'misspelled');",
    )
    .unwrap();
    cluster.wait_until_settled(SETTLE);
    let rows = c
        .query(
            "SELECT model, priced_as, cost, pg_typeof(cost)::text, scale(cost)
               FROM llmbatching.request_costs ORDER BY model",
            &[],
        )
        .unwrap();
    let priced: Vec<(String, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        priced,
        [
            (
                "gpt-4o-mini-2024-07-18".to_string(),
                Some("gpt-4o-mini".to_string())
            ),
            ("gpt-4o-mnii".to_string(), None),
        ]
    );
    let dated = &rows[0];
    assert_eq!(dated.get::<_, String>(3), "numeric");
    assert!(
        dated.get::<_, i32>(4) <= 10,
        "cost printed with too many places"
    );
    let unpriced: i64 = c
        .query_one(
            "SELECT unpriced FROM llmbatching.cost_by_model WHERE model = 'gpt-4o-mnii'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unpriced, 1);
}
