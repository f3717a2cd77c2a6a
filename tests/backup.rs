//! Backups, moves and copies: pg_dump and pg_restore keep every request and answer, a copy of
//! the database never pays for the original's work, and a move finishes it exactly once.

mod common;

use common::{pg_bin, quick, Cluster, EmulatorConfig};
use postgres::Client;
use std::process::Command;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(180);

/// A provider whose batches stay in progress long enough to be caught in flight.
fn slow() -> EmulatorConfig {
    EmulatorConfig {
        in_progress_ms: 4000,
        ..quick()
    }
}

/// One batch of 20 at a time: 20 answered, 20 in flight and 10 queued, once the second batch
/// is at the provider.
const ONE_BATCH_OF_20: [(&str, &str); 2] = [
    ("llmbatching.batch_max_requests", "20"),
    ("llmbatching.max_batches_in_flight", "1"),
];

fn dump(cluster: &Cluster, args: &[&str], file: &std::path::Path) {
    let out = Command::new(pg_bin().join("pg_dump"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port.to_string(),
            "-U",
            "postgres",
        ])
        .args(args)
        .arg("-f")
        .arg(file)
        .arg("postgres")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn restore(cluster: &Cluster, args: &[&str], file: &std::path::Path) {
    let out = Command::new(pg_bin().join("pg_restore"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(args)
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The original: 50 requests, of which 20 answered, 20 in a batch at the provider and 10
/// queued behind it; plus an administrator's own price row and a changed shipped one.
fn original_with_work_in_flight() -> Cluster {
    let cluster = Cluster::start(slow(), &ONE_BATCH_OF_20);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE EXTENSION llmbatching;
         INSERT INTO llmbatching.prices (model, input, output, batch_input, batch_output, taken_on)
              VALUES ('my-model', 1, 2, 0.5, 1, '2026-11-01');
         UPDATE llmbatching.prices SET batch_output = 0.31 WHERE model = 'gpt-4o-mini';
         SELECT llm_submit('m', 'early ' || g, job => 'early') FROM generate_series(1, 20) g;",
    )
    .unwrap();
    cluster.wait_until_settled(SETTLE);
    c.batch_execute(
        "SELECT llm_submit('m', 'late ' || g, job => 'late') FROM generate_series(1, 30) g",
    )
    .unwrap();
    cluster.wait_for_a_submitted_batch();
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'queued'"),
        10,
        "the scene is not set: 10 queued behind a batch in flight"
    );
    cluster
}

/// A second cluster speaking to the same provider (same emulator, same key).
fn second_cluster_beside(original: &Cluster) -> Cluster {
    Cluster::start(
        quick(),
        &[
            ("llmbatching.api_base", original.emulator.base_url.as_str()),
            ("llmbatching.batch_max_requests", "20"),
        ],
    )
}

fn counts(c: &mut Client) -> (i64, i64, i64) {
    let row = c
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE state = 'completed' AND result_text IS NOT NULL),
                    count(*) FILTER (WHERE state IN ('queued', 'submitted'))
               FROM llmbatching.requests",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[test]
fn a_restored_copy_keeps_every_row_and_sends_nothing_of_the_originals() {
    let original = original_with_work_in_flight();
    let file = original.dir.join("dump.custom");
    dump(&original, &["-Fc"], &file);
    let batches_before = original.emulator.stats().batches_created;

    let copy = second_cluster_beside(&original);
    restore(&copy, &[], &file);
    let mut c = copy.client();
    assert_eq!(counts(&mut c), (50, 20, 30), "requests of the copy");
    let prices: (i64, f64, i64) = {
        let row = c
            .query_one(
                "SELECT count(*), (SELECT batch_output::float8 FROM llmbatching.prices WHERE model = 'gpt-4o-mini'),
                        (SELECT count(*) FROM llmbatching.prices WHERE model = 'my-model')
                   FROM llmbatching.prices",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(
        prices,
        (
            original.count("SELECT count(*) FROM llmbatching.prices"),
            0.31,
            1
        ),
        "prices: every row once, the administrator's change and row kept"
    );

    // The copy knows it is one: it says so, and sends nothing.
    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut user = copy.client_with_notices(notices.clone());
    let fresh: i64 = user
        .query_one("SELECT llm_submit('m', 'submitted in the copy')", &[])
        .unwrap()
        .get(0);
    assert!(
        notices
            .lock()
            .unwrap()
            .iter()
            .any(|n| n.contains("is a copy") && n.contains("llm_adopt")),
        "{:?}",
        notices.lock().unwrap()
    );
    copy.wait_for(
        "the worker to say it is in a copy",
        Duration::from_secs(30),
        || copy.log().contains("is a copy"),
    );

    // The original finishes every request; the copy touches none of its batches or files.
    original.wait_until_settled(SETTLE);
    let mut o = original.client();
    assert_eq!(counts(&mut o), (50, 50, 0));
    std::thread::sleep(Duration::from_secs(2));
    let stats = original.emulator.stats();
    assert_eq!(
        stats.batches_created,
        original.count("SELECT count(*) FROM llmbatching.batches") as u64,
        "a batch was created by the copy"
    );
    assert!(stats.batches_created >= batches_before);
    assert!(
        stats.ran_more_than_once().is_empty(),
        "{:?}",
        stats.ran_more_than_once()
    );
    assert_eq!(
        stats.files_deleted,
        original.count(
            "SELECT coalesce(sum((input_file_id IS NOT NULL)::int + (output_file_id IS NOT NULL)::int
                                 + (error_file_id IS NOT NULL)::int), 0)
               FROM llmbatching.batches WHERE files_deleted_at IS NOT NULL"
        ) as u64,
        "files were deleted by someone other than the original"
    );
    assert_eq!(
        counts(&mut c).2,
        31,
        "the copy moved its inherited or new requests"
    );

    // Adopted as a copy of its own: what it inherited stays with the original, its own goes out.
    c.batch_execute("SELECT llmbatching.llm_adopt(as_copy => true)")
        .unwrap();
    copy.wait_until_settled(SETTLE);
    let state: String = c
        .query_one(
            "SELECT state FROM llmbatching.requests WHERE id = $1",
            &[&fresh],
        )
        .unwrap()
        .get(0);
    assert_eq!(state, "completed");
    assert_eq!(
        copy.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'cancelled'"),
        30,
        "the inherited unfinished requests are left with the original"
    );
    let stats = original.emulator.stats();
    assert!(
        stats.ran_more_than_once().is_empty(),
        "{:?}",
        stats.ran_more_than_once()
    );
}

#[test]
fn a_move_finishes_the_work_in_flight_once() {
    let original = original_with_work_in_flight();
    let file = original.dir.join("dump.sql");
    dump(&original, &[], &file);
    original.pg_ctl(&["stop", "-m", "fast", "-w"]);

    let moved = second_cluster_beside(&original);
    let out = Command::new(pg_bin().join("psql"))
        .args([
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &moved.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-f",
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = moved.client();
    c.batch_execute("SELECT llmbatching.llm_adopt()").unwrap();
    moved.wait_until_settled(SETTLE);
    assert_eq!(counts(&mut c), (50, 50, 0));
    let stats = original.emulator.stats();
    assert!(
        stats.ran_more_than_once().is_empty(),
        "requests ran twice: {:?}",
        stats.ran_more_than_once()
    );
    assert_eq!(
        stats.batches_created,
        moved.count("SELECT count(*) FROM llmbatching.batches") as u64,
        "a batch was created twice"
    );
    assert_eq!(
        moved.count("SELECT count(*) FROM llmbatching.batches WHERE state <> 'done' OR files_deleted_at IS NULL"),
        0,
        "a batch was left open or its files at the provider"
    );
}

#[test]
fn data_only_restores_into_a_database_that_has_the_extension() {
    let original = Cluster::with_extension(&[]);
    let mut o = original.client();
    o.batch_execute(
        "UPDATE llmbatching.prices SET batch_output = 0.31 WHERE model = 'gpt-4o-mini';
         SELECT llm_submit('m', 'row ' || g) FROM generate_series(1, 5) g;",
    )
    .unwrap();
    original.wait_until_settled(SETTLE);
    let file = original.dir.join("data.custom");
    dump(&original, &["-Fc", "--data-only"], &file);

    let target = second_cluster_beside(&original);
    let mut c = target.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    restore(&target, &["--data-only"], &file);
    assert_eq!(counts(&mut c), (5, 5, 0));
    assert_eq!(
        target.count("SELECT count(*) FROM llmbatching.prices"),
        original.count("SELECT count(*) FROM llmbatching.prices"),
        "shipped prices duplicated or lost"
    );
    let price: f64 = c
        .query_one(
            "SELECT batch_output::float8 FROM llmbatching.prices WHERE model = 'gpt-4o-mini'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(price, 0.31);
    // New requests take new ids after the restored ones.
    let id: i64 = c
        .query_one("SELECT llm_submit('m', 'after')", &[])
        .unwrap()
        .get(0);
    assert!(id > 5, "the id sequence was not restored: {id}");
}
