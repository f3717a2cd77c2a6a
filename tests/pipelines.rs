//! Pipelines as users build them: classifying a table in place, jobs and their progress,
//! waiting and notification, structured answers and embeddings.

mod common;

use common::{quick, Cluster, EmulatorConfig};
use llmbatching_emulator::answers::{echo_answer, embedding_of, OFF_LABEL_MARKER};
use postgres::fallible_iterator::FallibleIterator;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(180);

#[test]
fn classifying_a_table_in_place_writes_each_answer_into_its_row_even_with_a_composite_key() {
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1s")]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE TABLE reviews (shop text, n int, body text, sentiment text, PRIMARY KEY (shop, n));
         INSERT INTO reviews (shop, n, body)
         SELECT s, g, 'review ' || s || g FROM unnest(ARRAY['north', 'south']) s, generate_series(1, 10) g;
         INSERT INTO reviews (shop, n, body) VALUES ('east', 1, NULL);",
    )
    .unwrap();
    let row = c
        .query_one(
            "SELECT * FROM llm_classify('reviews', 'sentiment', $$'Classify: ' || body$$, 'm')",
            &[],
        )
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i64>(1)),
        ("reviews.sentiment".to_string(), 20)
    );
    // Meanwhile the table changes: a row is deleted, one edited, one re-keyed.
    c.batch_execute(
        "DELETE FROM reviews WHERE shop = 'north' AND n = 1;
         UPDATE reviews SET body = 'edited' WHERE shop = 'north' AND n = 2;
         UPDATE reviews SET n = 100 WHERE shop = 'north' AND n = 3;",
    )
    .unwrap();
    assert!(c
        .query_one(
            "SELECT llm_wait(job => 'reviews.sentiment', timeout => '2 min')",
            &[]
        )
        .unwrap()
        .get::<_, bool>(0));

    for row in c
        .query(
            "SELECT shop, n, body, sentiment FROM reviews WHERE shop <> 'east'",
            &[],
        )
        .unwrap()
    {
        let (shop, n, body, sentiment): (String, i32, String, Option<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        match (shop.as_str(), n) {
            // The answer is to the prompt as it was sent.
            ("north", 2) => {
                assert_eq!(sentiment, Some(echo_answer("m", "Classify: review north2")))
            }
            ("north", 100) => assert_eq!(sentiment, None),
            _ => assert_eq!(
                sentiment,
                Some(echo_answer("m", &format!("Classify: {body}"))),
                "{shop} {n}"
            ),
        }
    }
    let outcomes: Vec<(String, i64)> = c
        .query(
            "SELECT outcome, count(*) FROM llmbatching.writebacks GROUP BY 1 ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        outcomes,
        [("row missing".to_string(), 2), ("written".to_string(), 18)]
    );
}

#[test]
fn labels_are_guaranteed_and_structured_answers_arrive_as_json() {
    let cluster = Cluster::with_extension(&[]);
    let mut c = cluster.client();
    c.batch_execute(&format!(
        "CREATE TYPE mood AS ENUM ('positive', 'negative', 'neutral');
         CREATE TABLE tickets (id bigint PRIMARY KEY, body text, mood mood, facts jsonb);
         INSERT INTO tickets (id, body) VALUES
             (1, 'a positive experience'), (2, 'so negative'), (3, 'whatever'), (4, 'odd {OFF_LABEL_MARKER}');"
    ))
    .unwrap();
    c.batch_execute(
        "SELECT llm_classify('tickets', 'mood', 'body', 'm', labels => ARRAY['positive', 'negative', 'neutral'], job => 'moods');
         SELECT llm_classify('tickets', 'facts', 'body', 'm', job => 'facts', filter => 'id <= 2',
             schema => '{\"type\": \"object\", \"properties\": {\"summary\": {\"type\": \"string\"}, \"urgent\": {\"type\": \"boolean\"}}}');",
    )
    .unwrap();
    assert!(c
        .query_one(
            "SELECT llm_wait(job => 'moods') AND llm_wait(job => 'facts')",
            &[]
        )
        .unwrap()
        .get::<_, bool>(0));
    let moods: Vec<Option<String>> = c
        .query("SELECT mood::text FROM tickets ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // No label appears in ticket 3, so the emulator picks the first; ticket 4 answered off the list.
    assert_eq!(
        moods,
        [
            Some("positive".into()),
            Some("negative".into()),
            Some("positive".into()),
            None
        ]
    );
    let error: String = c
        .query_one("SELECT llm_error(w.request_id) FROM llmbatching.writebacks w WHERE w.row_key = '{\"id\": 4}'", &[])
        .unwrap()
        .get(0);
    assert!(
        error.contains("is not one of the labels positive, negative, neutral"),
        "{error}"
    );
    let facts: serde_json::Value = c
        .query_one("SELECT facts FROM tickets WHERE id = 2", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        facts,
        serde_json::json!({"summary": "so negative", "urgent": true})
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM tickets WHERE facts IS NOT NULL"),
        2
    );

    let id: i64 = c
        .query_one("SELECT llm_submit_json('m', 'hi', '{\"type\": \"object\", \"properties\": {\"n\": {\"type\": \"integer\"}}}', endpoint => '/v1/chat/completions')", &[])
        .unwrap()
        .get(0);
    assert!(c
        .query_one("SELECT llm_wait(ARRAY[$1::bigint])", &[&id])
        .unwrap()
        .get::<_, bool>(0));
    let answer: serde_json::Value = c
        .query_one("SELECT llm_answer_json($1)", &[&id])
        .unwrap()
        .get(0);
    assert_eq!(answer, serde_json::json!({"n": 2}));
}

#[test]
fn embeddings_are_read_as_real_arrays_and_written_back_in_place() {
    let cluster = Cluster::with_extension(&[]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, body text, embedding real[]);
         INSERT INTO docs VALUES (1, 'alpha', NULL), (2, 'beta', NULL);
         SELECT llm_classify('docs', 'embedding', 'body', 'text-embedding-3-small', endpoint => '/v1/embeddings', job => 'emb');",
    )
    .unwrap();
    assert!(c
        .query_one("SELECT llm_wait(job => 'emb')", &[])
        .unwrap()
        .get::<_, bool>(0));
    let stored: Vec<f32> = c
        .query_one("SELECT embedding FROM docs WHERE id = 1", &[])
        .unwrap()
        .get(0);
    let expected = embedding_of("alpha");
    assert_eq!(stored.len(), expected.len());
    assert!(
        stored
            .iter()
            .zip(&expected)
            .all(|(a, b)| (a - b).abs() < 1e-6),
        "{stored:?}"
    );
    let via_function: Vec<f32> = c
        .query_one("SELECT llm_embedding(request_id) FROM llmbatching.writebacks WHERE row_key = '{\"id\": 2}'", &[])
        .unwrap()
        .get(0);
    assert_eq!(via_function.len(), 8);
}

#[test]
fn jobs_show_progress_tokens_and_an_estimated_finish() {
    let cluster = Cluster::start(
        EmulatorConfig {
            in_progress_ms: 3000,
            ..quick()
        },
        &[],
    );
    let mut c = cluster.client();
    // A job's progress and finish come from the reader's own requests: a first part of the job
    // finishes, then the rest is submitted.
    c.batch_execute(
        "CREATE EXTENSION llmbatching;
         SELECT llm_submit('m', 'item ' || g, job => 'nightly') FROM generate_series(1, 10) g;
         SELECT llm_submit('m', 'other', job => 'other');",
    )
    .unwrap();
    assert!(c
        .query_one("SELECT llm_wait(job => 'nightly')", &[])
        .unwrap()
        .get::<_, bool>(0));
    c.batch_execute(
        "SELECT llm_submit('m', 'item ' || g, job => 'nightly') FROM generate_series(11, 30) g",
    )
    .unwrap();
    cluster.wait_for("the job to make progress", SETTLE, || {
        c.query_one("SELECT estimated_finish IS NOT NULL AND percent_done < 100 FROM llm_job_status('nightly')", &[])
            .unwrap()
            .get::<_, Option<bool>>(0)
            .unwrap_or(false)
    });
    let eta_in_future: bool = c
        .query_one(
            "SELECT estimated_finish > now() FROM llm_job_status('nightly')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(eta_in_future);
    assert!(c
        .query_one("SELECT llm_wait(job => 'nightly')", &[])
        .unwrap()
        .get::<_, bool>(0));
    let row = c
        .query_one(
            "SELECT total, completed, percent_done::float8, input_tokens > 0 AND output_tokens > 0,
                    estimated_finish = (SELECT max(finished_at) FROM llmbatching.requests WHERE job = 'nightly')
               FROM llm_job_status('nightly')",
            &[],
        )
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, f64>(2)
        ),
        (30, 30, 100.0)
    );
    assert!(row.get::<_, bool>(3) && row.get::<_, bool>(4));
    assert_eq!(cluster.count("SELECT count(*) FROM llmbatching.jobs"), 2);
}

#[test]
fn waiting_times_out_reports_progress_and_can_be_cancelled() {
    let cluster = Cluster::start(
        EmulatorConfig {
            in_progress_ms: 4000,
            ..quick()
        },
        &[],
    );
    let notices = Arc::new(Mutex::new(Vec::new()));
    let mut c = cluster.client_with_notices(notices.clone());
    c.batch_execute("CREATE EXTENSION llmbatching; SELECT llm_submit('m', 'slow ' || g, job => 'slow') FROM generate_series(1, 3) g")
        .unwrap();
    let done: bool = c
        .query_one(
            "SELECT llm_wait(job => 'slow', timeout => '700ms', report_every => '200ms')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!done);
    let seen = notices.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|n| n.starts_with("llm_wait: 0 of 3 requests finished")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|n| n.starts_with("llm_wait: timed out")),
        "{seen:?}"
    );

    let handle = {
        let mut w = cluster.client();
        let pid: i32 = w.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
        let thread = std::thread::spawn(move || {
            w.query_one("SELECT llm_wait(job => 'slow')", &[])
                .map(|r| r.get::<_, bool>(0))
        });
        (pid, thread)
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(c
        .query_one("SELECT pg_cancel_backend($1)", &[&handle.0])
        .unwrap()
        .get::<_, bool>(0));
    let err = handle.1.join().unwrap().unwrap_err();
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert_eq!(message, "canceling statement due to user request");

    for (sql, expected) in [
        ("SELECT llm_wait()", "invalid argument \"ids\""),
        ("SELECT llm_wait(job => 'slow', timeout => '-1 s')", "invalid argument \"timeout\""),
        ("BEGIN; SELECT llm_submit('m', 'x', job => 'same'); SELECT llm_wait(job => 'same'); COMMIT;", "commit it first"),
    ] {
        let err = c.batch_execute(sql).expect_err(sql);
        let message = err.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
        assert!(message.contains(expected), "{sql}: {message}");
        let _ = c.batch_execute("ROLLBACK");
    }
    assert!(c
        .query_one("SELECT llm_wait(job => 'slow')", &[])
        .unwrap()
        .get::<_, bool>(0));
}

#[test]
fn each_role_is_notified_on_its_own_channel_with_nothing_in_the_payload() {
    let cluster = Cluster::with_extension(&[]);
    cluster
        .client()
        .batch_execute(
            "CREATE ROLE alice LOGIN IN ROLE llmbatching_user;
             CREATE ROLE bob LOGIN IN ROLE llmbatching_user;",
        )
        .unwrap();
    let listen = |role: &str| {
        let mut c = cluster.client_as(role);
        let channel: String = c.query_one("SELECT llm_channel()", &[]).unwrap().get(0);
        c.batch_execute(&format!("LISTEN \"{channel}\"")).unwrap();
        (c, channel)
    };
    let (mut alice_listener, alice_channel) = listen("alice");
    let (mut bob_listener, bob_channel) = listen("bob");
    assert_ne!(alice_channel, bob_channel);
    // The old shared channels carry nothing any more.
    alice_listener
        .batch_execute("LISTEN llmbatching_request; LISTEN llmbatching_job")
        .unwrap();
    let mut alice = cluster.client_as("alice");
    alice
        .execute(
            "SELECT llm_submit('m', 'ping ' || g, job => 'pings') FROM generate_series(1, 3) g",
            &[],
        )
        .unwrap();
    cluster.wait_until_settled(Duration::from_secs(60));

    let drain = |c: &mut postgres::Client| {
        let mut got = Vec::new();
        let mut notifications = c.notifications();
        let mut batch = notifications.timeout_iter(Duration::from_millis(1000));
        while let Ok(Some(n)) = batch.next() {
            got.push((n.channel().to_owned(), n.payload().to_owned()));
        }
        got
    };
    let got = drain(&mut alice_listener);
    assert!(!got.is_empty(), "alice was not notified");
    assert!(
        got.iter()
            .all(|(channel, payload)| *channel == alice_channel && payload.is_empty()),
        "{got:?}"
    );
    assert!(
        drain(&mut bob_listener).is_empty(),
        "bob heard of alice's requests"
    );
}

#[test]
fn single_requests_can_be_written_back_before_or_after_they_finish() {
    let cluster = Cluster::with_extension(&[]);
    let mut c = cluster.client();
    c.batch_execute("CREATE TABLE notes (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), body text, summary text, score int)")
        .unwrap();
    c.batch_execute("INSERT INTO notes (body) VALUES ('first'), ('second')")
        .unwrap();
    let rows = c
        .query("SELECT id::text, body FROM notes ORDER BY body", &[])
        .unwrap();
    let key = |i: usize| serde_json::json!({"id": rows[i].get::<_, String>(0)});
    let early: i64 = c
        .query_one("SELECT llm_submit('m', 'first')", &[])
        .unwrap()
        .get(0);
    c.execute(
        "SELECT llm_write_back($1, 'notes', 'summary', $2)",
        &[&early, &key(0)],
    )
    .unwrap();
    let late: i64 = c
        .query_one("SELECT llm_submit('m', 'second')", &[])
        .unwrap()
        .get(0);
    assert!(c
        .query_one("SELECT llm_wait(ARRAY[$1::bigint, $2])", &[&early, &late])
        .unwrap()
        .get::<_, bool>(0));
    c.execute(
        "SELECT llm_write_back($1, 'notes', 'summary', $2)",
        &[&late, &key(1)],
    )
    .unwrap();
    // An answer that is already there is written by the worker's next round.
    let expected = vec![echo_answer("m", "first"), echo_answer("m", "second")];
    cluster.wait_for("both answers to be written", SETTLE, || {
        let summaries: Vec<Option<String>> = c
            .query("SELECT summary FROM notes ORDER BY body", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        summaries.iter().flatten().cloned().collect::<Vec<_>>() == expected
    });

    // An answer that cannot be stored is recorded against its write-back; the worker goes on.
    let bad: i64 = c
        .query_one("SELECT llm_submit('m', 'not a number')", &[])
        .unwrap()
        .get(0);
    c.execute(
        "SELECT llm_write_back($1, 'notes', 'score', $2)",
        &[&bad, &key(0)],
    )
    .unwrap();
    let good: i64 = c
        .query_one("SELECT llm_submit('m', 'third')", &[])
        .unwrap()
        .get(0);
    c.execute(
        "SELECT llm_write_back($1, 'notes', 'summary', $2)",
        &[&good, &key(1)],
    )
    .unwrap();
    assert!(c
        .query_one("SELECT llm_wait(ARRAY[$1::bigint, $2])", &[&bad, &good])
        .unwrap()
        .get::<_, bool>(0));
    let outcome: String = c
        .query_one(
            "SELECT outcome FROM llmbatching.writebacks WHERE request_id = $1",
            &[&bad],
        )
        .unwrap()
        .get(0);
    assert!(
        outcome.starts_with("error: invalid input syntax for type integer"),
        "{outcome}"
    );
    let second: String = c
        .query_one("SELECT summary FROM notes WHERE body = 'second'", &[])
        .unwrap()
        .get(0);
    assert_eq!(second, echo_answer("m", "third"));

    // Registered again while the worker is writing an entry that holds the answer (here an
    // entry locked as the worker locks those it writes, then removed as it removes them): the
    // answer gets an entry of its own, and is written.
    c.batch_execute("UPDATE notes SET summary = NULL WHERE body = 'first'")
        .unwrap();
    let entry: i64 = c
        .query_one(
            "INSERT INTO llmbatching.writeback_queue (submitted_by, request_ids, due_at)
             VALUES (current_user, ARRAY[$1::bigint], now() + interval '1 day') RETURNING id",
            &[&early],
        )
        .unwrap()
        .get(0);
    let mut writer = cluster.client();
    let mut writing = writer.transaction().unwrap();
    writing
        .execute(
            "SELECT FROM llmbatching.writeback_queue WHERE id = $1 FOR UPDATE",
            &[&entry],
        )
        .unwrap();
    c.execute(
        "SELECT llm_write_back($1, 'notes', 'summary', $2)",
        &[&early, &key(0)],
    )
    .unwrap();
    writing
        .execute(
            "DELETE FROM llmbatching.writeback_queue WHERE id = $1",
            &[&entry],
        )
        .unwrap();
    writing.commit().unwrap();
    cluster.wait_for("the answer registered again to be written", SETTLE, || {
        c.query_one("SELECT summary FROM notes WHERE body = 'first'", &[])
            .unwrap()
            .get::<_, Option<String>>(0)
            == Some(echo_answer("m", "first"))
    });
}

#[test]
fn bad_pipeline_arguments_are_errors_naming_the_argument() {
    let cluster = Cluster::with_extension(&[]);
    let mut c = cluster.client();
    c.batch_execute("CREATE TABLE keyless (body text, answer text); CREATE TABLE t (id int PRIMARY KEY, body text, answer text)")
        .unwrap();
    let id: i64 = c
        .query_one("SELECT llm_submit('m', 'x')", &[])
        .unwrap()
        .get(0);
    let cases = [
        ("SELECT llm_classify('keyless', 'answer', 'body', 'm')".to_string(), "\"target\": table public.keyless has no primary key"),
        ("SELECT llm_classify('t', 'nope', 'body', 'm')".to_string(), "\"target_column\": table public.t has no column nope"),
        ("SELECT llm_classify('t', 'id', 'body', 'm')".to_string(), "\"target_column\": id is part of the primary key"),
        ("SELECT llm_classify('t', 'answer', '', 'm')".to_string(), "\"prompt\""),
        ("SELECT llm_classify('t', 'answer', 'body', 'm', labels => ARRAY['a','b'], schema => '{}')".to_string(), "\"schema\""),
        ("SELECT llm_submit_label('m', 'x', ARRAY['only'])".to_string(), "\"labels\": must hold at least two labels"),
        ("SELECT llm_submit_json('m', 'x', NULL)".to_string(), "\"schema\": must not be NULL"),
        ("SELECT llm_submit_json('m', 'x', '{}', endpoint => '/v1/embeddings')".to_string(), "\"endpoint\": structured answers need"),
        ("SELECT llm_submit('m', 'x', job => ' ')".to_string(), "\"job\": must not be empty"),
        (format!("SELECT llm_write_back({id}, 't', 'answer', '{{\"other\": 1}}')"), "\"row_key\""),
        ("SELECT llm_write_back(-5, 't', 'answer', '{\"id\": 1}')".to_string(), "\"id\": no request -5"),
    ];
    for (sql, expected) in cases {
        let err = c.batch_execute(&sql).expect_err(&sql);
        let message = err
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(message.contains(expected), "{sql}: {message}");
    }
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests"),
        1,
        "a refused call queued something"
    );
}

/// The process each answer was written by, as the target's trigger saw it.
fn writers_of(c: &mut postgres::Client) -> Vec<String> {
    c.query(
        "SELECT DISTINCT backend_type FROM written_by ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A table `tickets` of `rows` rows whose trigger takes `seconds` per row written and records in
/// `written_by` which process wrote it.
fn tickets_noting_their_writer(c: &mut postgres::Client, rows: i32, seconds: f64) {
    c.batch_execute(&format!(
        "CREATE TABLE tickets (id int PRIMARY KEY, body text, label text);
         INSERT INTO tickets SELECT g, 'ticket ' || g FROM generate_series(1, {rows}) g;
         CREATE TABLE written_by (id int, backend_type text);
         CREATE FUNCTION note_writer() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_catalog.pg_sleep({seconds});
             INSERT INTO public.written_by
             SELECT NEW.id, a.backend_type FROM pg_catalog.pg_stat_activity a WHERE a.pid = pg_catalog.pg_backend_pid();
             RETURN NEW;
         END $$;
         CREATE TRIGGER note_writer AFTER UPDATE OF label ON tickets FOR EACH ROW EXECUTE FUNCTION note_writer();"
    ))
    .unwrap();
}

/// Records in `read_by` which process applied each answer to its request, taking `seconds` per
/// answer.
fn note_readers(c: &mut postgres::Client, seconds: f64) {
    c.batch_execute(&format!(
        "CREATE TABLE read_by (id bigint, backend_type text, pid int);
         CREATE FUNCTION note_reader() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             PERFORM pg_catalog.pg_sleep({seconds});
             INSERT INTO public.read_by
             SELECT NEW.id, a.backend_type, a.pid FROM pg_catalog.pg_stat_activity a WHERE a.pid = pg_catalog.pg_backend_pid();
             RETURN NEW;
         END $$;
         CREATE TRIGGER note_reader AFTER UPDATE ON llmbatching.requests FOR EACH ROW
             WHEN (OLD.state = 'submitted' AND NEW.state = 'completed') EXECUTE FUNCTION note_reader();"
    ))
    .unwrap();
}

fn readers_of(c: &mut postgres::Client) -> Vec<String> {
    c.query("SELECT DISTINCT backend_type FROM read_by ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Classifies five rows of `tickets`, noting which process applies each answer to its
/// request and which writes it into its row.
fn classify_noted_tickets(c: &mut postgres::Client) {
    tickets_noting_their_writer(c, 5, 0.0);
    note_readers(c, 0.0);
    c.batch_execute("SELECT llm_classify('tickets', 'label', 'body', 'm')")
        .unwrap();
}

/// Classifies five rows of a table whose trigger records which process wrote each answer, and
/// waits until all are written. Returns the processes that applied the answers to their
/// requests, and those that wrote them into the rows.
fn classify_recording_the_writer(cluster: &Cluster) -> (Vec<String>, Vec<String>) {
    let mut c = cluster.client();
    classify_noted_tickets(&mut c);
    cluster.wait_for("the five answers to be written", SETTLE, || {
        cluster.count("SELECT count(*) FROM tickets WHERE label IS NOT NULL") == 5
    });
    assert_eq!(cluster.count("SELECT count(*) FROM written_by"), 5);
    assert_eq!(cluster.count("SELECT count(*) FROM read_by"), 5);
    (readers_of(&mut c), writers_of(&mut c))
}

#[test]
fn answers_are_read_and_written_back_by_processes_of_their_own_and_wait_for_a_writer_slot() {
    // The reader and the writer run beside the worker, so answers are applied and written
    // while the next batches move.
    let cluster = Cluster::with_extension(&[]);
    assert_eq!(
        classify_recording_the_writer(&cluster),
        (
            vec!["llmbatching reader".to_string()],
            vec!["llmbatching writer".to_string()]
        )
    );
    drop(cluster);

    // With no background worker slot left for them (only the launcher and the worker fit),
    // the worker reads the answers itself, but never runs a role's code: the answers wait for
    // a writer, which starts once there is room for one.
    let cluster = Cluster::with_extension(&[
        ("max_worker_processes", "2"),
        ("max_logical_replication_workers", "0"),
        ("max_parallel_workers", "0"),
    ]);
    let mut c = cluster.client();
    classify_noted_tickets(&mut c);
    cluster.wait_for("the five answers to be read back", SETTLE, || {
        cluster.count("SELECT count(*) FROM read_by") == 5
    });
    assert_eq!(readers_of(&mut c), ["llmbatching worker"]);
    cluster.wait_for("the log to say why the answers wait", SETTLE, || {
        cluster
            .log()
            .contains("no background worker slot is free for the writer")
    });
    assert_eq!(
        cluster.count("SELECT count(*) FROM tickets WHERE label IS NOT NULL"),
        0
    );
    drop(c);
    cluster.set(&[("max_worker_processes", "4")]);
    cluster.restart("fast");
    cluster.wait_for("the five answers to be written", SETTLE, || {
        cluster.count("SELECT count(*) FROM tickets WHERE label IS NOT NULL") == 5
    });
    let mut c = cluster.client();
    assert_eq!(writers_of(&mut c), ["llmbatching writer"]);
}

#[test]
fn a_worker_restarted_while_a_batch_is_read_back_loses_no_answer_and_sends_none_twice() {
    // 4,000 answers in one batch, each taking two milliseconds to apply (the trigger noting who
    // applied it): the reader is mid-way through them when the worker restarts, which stops the
    // reader after its chunk; the next worker downloads the batch again and reads what is left,
    // as a failure of no step.
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    note_readers(&mut c, 0.002);
    c.batch_execute(
        "SELECT count(llm_submit('m', 'question ' || g)) FROM generate_series(1, 4000) g",
    )
    .unwrap();
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    cluster.wait_for("the reader to start applying answers", SETTLE, || {
        cluster.count("SELECT count(*) FROM read_by") > 0
    });
    c.batch_execute("SELECT llmbatching.llm_worker_restart()")
        .unwrap();
    cluster.wait_for(
        "every answer to be applied and the batch done",
        SETTLE,
        || {
            cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'")
                == 4000
                && cluster.count("SELECT count(*) FROM llmbatching.batches WHERE state <> 'done'")
                    == 0
        },
    );
    assert_eq!(
        cluster.count("SELECT count(DISTINCT id) FROM read_by"),
        4000
    );
    assert!(readers_of(&mut c).contains(&"llmbatching reader".to_string()));
    assert!(
        cluster.count("SELECT count(DISTINCT pid) FROM read_by") >= 2,
        "the first reader was not stopped mid-way"
    );
    let twice = cluster.emulator.stats().ran_more_than_once();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.batches WHERE step_failures > 0 OR last_error IS NOT NULL"
        ),
        0,
        "the stopped reading was taken for a failure"
    );
}

#[test]
fn a_worker_restarted_while_answers_are_written_back_writes_each_once_and_loses_none() {
    // Groups of 5 answers, each row's trigger taking 0.2 s: the writer is mid-way through the
    // 40 answers when the worker restarts (and its writer with it, or after it).
    let cluster = Cluster::with_extension(&[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    tickets_noting_their_writer(&mut c, 40, 0.2);
    // One job per eight rows, so that the answers wait in several groups.
    for first in (1..=40).step_by(8) {
        c.execute(
            "SELECT llm_classify('tickets', 'label', 'body', 'm', job => 'part ' || $1::int, filter => format('id BETWEEN %s AND %s', $1::int, $1::int + 7))",
            &[&first],
        )
        .unwrap();
    }
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    cluster.wait_for("the writer to start writing", SETTLE, || {
        cluster.count("SELECT count(*) FROM written_by") > 0
    });
    c.batch_execute("SELECT llmbatching.llm_worker_restart()")
        .unwrap();
    cluster.wait_for("the 40 answers to be written", SETTLE, || {
        cluster.count("SELECT count(*) FROM tickets WHERE label IS NOT NULL") == 40
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        cluster.count("SELECT count(*) FROM (SELECT id FROM written_by GROUP BY id HAVING count(*) > 1) twice"),
        0,
        "an answer was written twice"
    );
    assert_eq!(
        cluster.count("SELECT count(DISTINCT id) FROM written_by"),
        40
    );
    assert_eq!(
        cluster.count(
            "SELECT count(*) FROM llmbatching.writebacks WHERE outcome IS DISTINCT FROM 'written'"
        ),
        0
    );
}
