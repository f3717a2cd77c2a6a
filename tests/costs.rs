//! Paying less than half: duplicates sent once, answers reused, usage and cost accounted.

mod common;

use common::Cluster;
use llmbatching_emulator::answers::echo_answer;
use postgres::Client;
use std::time::Duration;

fn sent(cluster: &Cluster) -> usize {
    cluster.emulator.stats().runs_per_custom_id.len()
}

fn submit_and_wait(c: &mut Client, sql: &str) -> i64 {
    let id: i64 = c.query_one(sql, &[]).unwrap().get(0);
    assert!(c
        .query_one(
            "SELECT llm_wait(ARRAY[$1::bigint], timeout => '2 min')",
            &[&id]
        )
        .unwrap()
        .get::<_, bool>(0));
    id
}

#[test]
fn when_a_quarter_of_the_requests_are_duplicates_the_provider_sees_each_distinct_one_once() {
    let cluster = Cluster::with_extension(&[]);
    let mut c = cluster.client();
    // 400 requests, 300 distinct prompts: g and g + 300 ask the same for g <= 100.
    c.batch_execute(
        "CREATE TABLE questions (id int PRIMARY KEY, prompt text, request_id bigint);
         INSERT INTO questions SELECT g, 'question ' || (g % 300) FROM generate_series(1, 400) g;
         UPDATE questions SET request_id = llm_submit('m', prompt, job => 'dupes');",
    )
    .unwrap();
    assert!(c
        .query_one("SELECT llm_wait(job => 'dupes', timeout => '3 min')", &[])
        .unwrap()
        .get::<_, bool>(0));
    for row in c
        .query(
            "SELECT prompt, llm_status(request_id), llm_result(request_id) FROM questions",
            &[],
        )
        .unwrap()
    {
        let prompt: String = row.get(0);
        assert_eq!(row.get::<_, String>(1), "completed", "{prompt}");
        assert_eq!(
            row.get::<_, Option<String>>(2),
            Some(echo_answer("m", &prompt))
        );
    }
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE reused_from IS NOT NULL"),
        100
    );
    assert_eq!(
        cluster.count("SELECT sum(request_count) FROM llmbatching.batches"),
        300
    );
    let stats = cluster.emulator.stats();
    assert_eq!(stats.runs_per_custom_id.len(), 300);
    assert!(stats.ran_more_than_once().is_empty());
    let reused_in_job: i64 = c
        .query_one(
            "SELECT reused FROM llmbatching.cost_by_job WHERE job = 'dupes'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(reused_in_job, 100);
}

#[test]
fn completed_answers_are_reused_per_setting_and_per_request() {
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "50ms")]);
    let mut c = cluster.client();
    let deterministic = "SELECT llm_submit('m', 'hello', options => '{\"temperature\": 0}')";
    let first = submit_and_wait(&mut c, deterministic);
    assert_eq!(sent(&cluster), 1);

    // The default, 'deterministic': a temperature-0 request is answered at once from the first.
    let again: i64 = c.query_one(deterministic, &[]).unwrap().get(0);
    let row = c
        .query_one("SELECT llm_status($1), llm_result($1), reused_from FROM llmbatching.requests WHERE id = $1", &[&again])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "completed");
    assert_eq!(
        row.get::<_, Option<String>>(1),
        Some(echo_answer("m", "hello"))
    );
    assert_eq!(row.get::<_, Option<i64>>(2), Some(first));

    // Not deterministic: sent each time, unless the request asks for reuse.
    submit_and_wait(&mut c, "SELECT llm_submit('m', 'world')");
    submit_and_wait(&mut c, "SELECT llm_submit('m', 'world')");
    assert_eq!(sent(&cluster), 3);
    let asked = submit_and_wait(&mut c, "SELECT llm_submit('m', 'world', reuse => true)");
    assert_eq!(sent(&cluster), 3);
    assert!(c
        .query_one(
            "SELECT reused_from IS NOT NULL FROM llmbatching.requests WHERE id = $1",
            &[&asked]
        )
        .unwrap()
        .get::<_, bool>(0));

    // A request can refuse reuse; so can a session; and old answers are not reused.
    submit_and_wait(
        &mut c,
        "SELECT llm_submit('m', 'hello', options => '{\"temperature\": 0}', reuse => false)",
    );
    assert_eq!(sent(&cluster), 4);
    c.batch_execute("SET llmbatching.reuse_answers = off")
        .unwrap();
    submit_and_wait(&mut c, deterministic);
    assert_eq!(sent(&cluster), 5);
    c.batch_execute("SET llmbatching.reuse_answers = always; SET llmbatching.reuse_max_age = '1s'")
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    submit_and_wait(&mut c, "SELECT llm_submit('m', 'world')");
    assert_eq!(sent(&cluster), 6);
    let err = c
        .batch_execute("SET llmbatching.reuse_answers = sometimes")
        .unwrap_err();
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("invalid value for parameter"));
}

#[test]
fn a_cancelled_request_hands_its_waiting_duplicates_on() {
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    let leader: i64 = c
        .query_one("SELECT llm_submit('m', 'same')", &[])
        .unwrap()
        .get(0);
    let followers: Vec<i64> = c
        .query(
            "SELECT llm_submit('m', 'same') FROM generate_series(1, 2)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE reused_from IS NOT NULL"),
        2
    );
    assert!(c
        .query_one("SELECT llm_cancel($1)", &[&leader])
        .unwrap()
        .get::<_, bool>(0));
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    assert!(c
        .query_one("SELECT llm_wait($1::bigint[])", &[&followers])
        .unwrap()
        .get::<_, bool>(0));
    for id in &followers {
        assert_eq!(
            c.query_one("SELECT llm_result($1)", &[id])
                .unwrap()
                .get::<_, Option<String>>(0),
            Some(echo_answer("m", "same"))
        );
    }
    assert_eq!(sent(&cluster), 1);
}

#[test]
fn usage_and_cost_are_accounted_per_request_job_model_and_day() {
    let cluster = Cluster::with_extension(&[]);
    let mut c = cluster.client();
    c.batch_execute(
        "INSERT INTO llmbatching.prices VALUES ('m', 2, 1, 8, 1, 0.5, 4, current_date, 'test');
         SELECT llm_submit('m', 'a fairly long prompt number ' || g, job => 'costed')
           FROM generate_series(1, 3) g, generate_series(1, 2) copy;
         SELECT llm_submit('gpt-4o-mini-2024-07-18', 'dated model name', job => 'costed');",
    )
    .unwrap();
    assert!(c
        .query_one("SELECT llm_wait(job => 'costed')", &[])
        .unwrap()
        .get::<_, bool>(0));

    let usage = c
        .query_one(
            "SELECT bool_and(cached_tokens = input_tokens / 4 AND reasoning_tokens = output_tokens / 5 AND input_tokens > 0)
               FROM llmbatching.requests WHERE reused_from IS NULL",
            &[],
        )
        .unwrap();
    assert!(usage.get::<_, bool>(0), "every usage field is stored");
    let batch_usage = cluster.count(
        "SELECT count(*) FROM llmbatching.batches b
          WHERE b.cached_tokens = (SELECT sum(cached_tokens) FROM llmbatching.requests r WHERE r.batch_id = b.id AND r.reused_from IS NULL)
            AND b.reasoning_tokens IS NOT NULL",
    );
    assert_eq!(
        batch_usage,
        cluster.count("SELECT count(*) FROM llmbatching.batches")
    );

    // The views agree with the prices applied by hand.
    let rows = c
        .query(
            "SELECT r.input_tokens, r.cached_tokens, r.output_tokens, r.reused_from IS NOT NULL, k.cost::float8, k.synchronous_cost::float8
               FROM llmbatching.requests r JOIN llmbatching.request_costs k USING (id) WHERE r.model = 'm'",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 6);
    let (mut cost, mut synchronous) = (0.0, 0.0);
    for row in &rows {
        let (input, cached, output): (i32, i32, i32) = (row.get(0), row.get(1), row.get(2));
        let reused: bool = row.get(3);
        let batch =
            ((input - cached) as f64 * 1.0 + cached as f64 * 0.5 + output as f64 * 4.0) / 1e6;
        let standard =
            ((input - cached) as f64 * 2.0 + cached as f64 * 1.0 + output as f64 * 8.0) / 1e6;
        let expected = if reused { 0.0 } else { batch };
        assert!((row.get::<_, f64>(4) - expected).abs() < 1e-12);
        assert!((row.get::<_, f64>(5) - standard).abs() < 1e-12);
        cost += expected;
        synchronous += standard;
    }
    let model = c
        .query_one("SELECT requests, reused, cost::float8, synchronous_cost::float8, saved_percent::float8 FROM llmbatching.cost_by_model WHERE model = 'm'", &[])
        .unwrap();
    assert_eq!((model.get::<_, i64>(0), model.get::<_, i64>(1)), (6, 3));
    assert!(
        (model.get::<_, f64>(2) - cost).abs() < 1e-12
            && (model.get::<_, f64>(3) - synchronous).abs() < 1e-12
    );
    assert!(
        model.get::<_, f64>(4) > 70.0,
        "half the price and half the requests reused: {}",
        model.get::<_, f64>(4)
    );
    let priced_as: String = c
        .query_one("SELECT priced_as FROM llmbatching.request_costs WHERE model = 'gpt-4o-mini-2024-07-18'", &[])
        .unwrap()
        .get(0);
    assert_eq!(priced_as, "gpt-4o-mini");
    assert_eq!(
        cluster.count("SELECT requests FROM llmbatching.cost_by_job WHERE job = 'costed'"),
        7
    );
    assert_eq!(cluster.count("SELECT requests FROM llmbatching.cost_by_day WHERE day = (now() AT TIME ZONE 'UTC')::date"), 7);
    assert!(
        cluster.count("SELECT count(*) FROM llmbatching.prices WHERE taken_on IS NOT NULL") >= 10,
        "seeded prices"
    );
}
