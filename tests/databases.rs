//! One install serving every database of a cluster: the launcher starts a worker for each
//! database that has the extension, follows CREATE and DROP of the extension and of databases
//! while work is in flight, never holds up DROP, RENAME or a copy of a database, keeps limits
//! per key across databases, and runs nothing on a standby until it is promoted.

mod common;

use common::{append_as_owner, pg_command, quick, Cluster, EmulatorConfig};
use postgres::Client;
use std::path::PathBuf;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(90);

fn connect(port: u16, database: &str) -> Client {
    postgres::Config::new()
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname(database)
        .connect(postgres::NoTls)
        .unwrap()
}

/// The databases that have a worker, sorted.
fn served(c: &mut Client) -> Vec<String> {
    let mut names: Vec<String> = c
        .query(
            "SELECT datname::text FROM pg_stat_activity
              WHERE backend_type = 'llmbatching worker' AND datname IS NOT NULL",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    names.sort();
    names
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

fn completed(c: &mut Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'",
    )
}

fn submit(c: &mut Client, how_many: i32, label: &str) {
    submit_to(c, "m", how_many, label)
}

fn submit_to(c: &mut Client, model: &str, how_many: i32, label: &str) {
    c.execute(
        "SELECT llmbatching.llm_submit($1, $2 || g) FROM generate_series(1, $3) g",
        &[&model, &label, &how_many],
    )
    .unwrap();
}

#[test]
fn every_database_with_the_extension_gets_a_worker_through_create_and_drop() {
    let cluster = Cluster::start(
        EmulatorConfig {
            in_progress_ms: 3000,
            ..quick()
        },
        &[],
    );
    let mut main = cluster.client();
    for name in ["a", "b", "c", "d"] {
        main.batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
    }
    let mut a = connect(cluster.port, "a");
    let mut b = connect(cluster.port, "b");
    let mut c = connect(cluster.port, "c");
    for db in [&mut a, &mut b, &mut c] {
        db.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    }
    // Three databases with the extension; none in postgres or d, which have none.
    cluster.wait_for("a worker in a, b and c", SETTLE, || {
        served(&mut main) == ["a", "b", "c"]
    });

    // A setting for one database applies to its worker only (read when the worker starts).
    main.batch_execute("ALTER DATABASE a SET llmbatching.batch_max_requests = 2")
        .unwrap();
    a.batch_execute("SELECT llmbatching.llm_worker_restart()")
        .unwrap();
    submit(&mut a, 4, "a");
    submit(&mut b, 3, "b");
    submit(&mut c, 3, "c");

    // DROP DATABASE (without FORCE) while c's batch is at the provider: the worker makes way
    // (DROP DATABASE fails if a session stays connected for 5 seconds).
    cluster.wait_for("a batch of c at the provider", SETTLE, || {
        count(
            &mut c,
            "SELECT count(*) FROM llmbatching.batches WHERE state = 'submitted'",
        ) > 0
    });
    drop(c);
    main.batch_execute("DROP DATABASE c").unwrap();

    // CREATE EXTENSION while a's and b's batches are in flight.
    let mut d = connect(cluster.port, "d");
    d.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    submit(&mut d, 2, "d");
    cluster.wait_for("the answers of a, b and d", SETTLE, || {
        completed(&mut a) == 4 && completed(&mut b) == 3 && completed(&mut d) == 2
    });
    let largest_batch =
        "SELECT max(n) FROM (SELECT count(*) n FROM llmbatching.requests GROUP BY batch_id) s";
    assert_eq!(count(&mut a, largest_batch), 2, "a's own setting");
    assert_eq!(
        count(&mut b, largest_batch),
        3,
        "the setting of the cluster"
    );
    cluster.wait_for("the workers of a, b and d only", SETTLE, || {
        served(&mut main) == ["a", "b", "d"]
    });

    // DROP EXTENSION stops the database's worker; CREATE EXTENSION brings one back.
    b.batch_execute("DROP EXTENSION llmbatching").unwrap();
    cluster.wait_for("b's worker to stop", SETTLE, || {
        served(&mut main) == ["a", "d"]
    });
    b.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    cluster.wait_for("b's worker to be back", SETTLE, || {
        served(&mut main) == ["a", "b", "d"]
    });

    // Renaming a database and copying one as a template do not wait for their workers.
    drop(a);
    main.batch_execute("ALTER DATABASE a RENAME TO renamed")
        .unwrap();
    drop(d);
    main.batch_execute("CREATE DATABASE copied TEMPLATE d")
        .unwrap();
    let mut renamed = connect(cluster.port, "renamed");
    submit(&mut renamed, 1, "renamed");
    cluster.wait_for("the renamed database's answer", SETTLE, || {
        completed(&mut renamed) == 5
    });
    let log = cluster.log();
    assert!(log.contains("the extension is not installed in this database"));
    assert!(log.contains("a command needs the database to itself"));
    assert!(
        !log.contains("FATAL:  database"),
        "a worker was started for a dropped database:\n{log}"
    );
}

/// Open batches and enqueued tokens of every database using one key, over time.
struct Timeline(Vec<(i64, f64, f64)>);

fn timeline(c: &mut Client) -> Timeline {
    Timeline(
        c.query(
            "SELECT estimated_tokens::bigint, extract(epoch FROM submitted_at)::float8,
                    extract(epoch FROM ended_at)::float8
               FROM llmbatching.batches WHERE model = 'm2' AND submitted_at IS NOT NULL",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect(),
    )
}

#[test]
fn limits_per_key_hold_across_databases() {
    let cluster = Cluster::start(
        EmulatorConfig {
            in_progress_ms: 1500,
            ..quick()
        },
        &[
            ("llmbatching.batch_max_requests", "10"),
            ("llmbatching.max_batches_in_flight", "1"),
        ],
    );
    let mut main = cluster.client();
    main.batch_execute("CREATE DATABASE other").unwrap();
    let mut other = connect(cluster.port, "other");
    for db in [&mut main, &mut other] {
        db.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    }
    cluster.wait_for("both workers", SETTLE, || {
        served(&mut main) == ["other", "postgres"]
    });
    // One batch in flight at a time, counted over both databases (they share the key).
    submit(&mut main, 20, "p");
    submit(&mut other, 20, "o");
    cluster.wait_for("every answer", SETTLE, || {
        completed(&mut main) == 20 && completed(&mut other) == 20
    });
    assert_eq!(cluster.emulator.stats().max_open_batches, 1);

    // The enqueued-token cap leaves room for one batch of the model at a time, whichever
    // database sends it.
    cluster.set(&[
        ("llmbatching.max_batches_in_flight", "100"),
        ("llmbatching.max_enqueued_tokens", "250"),
    ]);
    std::thread::sleep(Duration::from_secs(1));
    submit_to(&mut main, "m2", 20, "p");
    submit_to(&mut other, "m2", 20, "o");
    cluster.wait_for("every answer again", SETTLE, || {
        completed(&mut main) == 40 && completed(&mut other) == 40
    });
    let (mine, theirs) = (timeline(&mut main), timeline(&mut other));
    assert!(mine.0.len() >= 2 && theirs.0.len() >= 2);
    for (tokens, start, end) in &mine.0 {
        for (other_tokens, other_start, other_end) in &theirs.0 {
            let overlap = start < other_end && other_start < end;
            assert!(
                !overlap || tokens + other_tokens <= 250,
                "two databases' batches were at the provider at once over the cap"
            );
        }
    }
}

/// A hot standby of a cluster, made with pg_basebackup; stopped when dropped.
struct Standby {
    data: PathBuf,
    log: PathBuf,
    port: u16,
}

impl Standby {
    fn of(primary: &Cluster) -> Standby {
        let data = primary.dir.join("standby");
        let mut backup = pg_command("pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "-p",
            ])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&data);
        let out = backup.output().unwrap();
        assert!(out.status.success(), "pg_basebackup: {out:?}");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        append_as_owner(&data.join("postgresql.conf"), &format!("port = {port}\n"));
        let standby = Standby {
            log: primary.dir.join("standby.log"),
            data,
            port,
        };
        standby.pg_ctl(&["start", "-w", "-t", "60"]);
        standby
    }

    fn pg_ctl(&self, args: &[&str]) {
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(args);
        let out = c.output().unwrap();
        assert!(out.status.success(), "pg_ctl {args:?}: {out:?}");
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- standby log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["stop", "-m", "immediate"]);
        let _ = c.output();
    }
}

#[test]
fn a_standby_runs_no_worker_and_once_promoted_drains_the_queue_without_sending_twice() {
    let primary = Cluster::with_extension_and(
        EmulatorConfig {
            in_progress_ms: 4000,
            ..quick()
        },
        &[("llmbatching.batch_max_requests", "5")],
    );
    let mut p = primary.client();
    submit(&mut p, 5, "first ");
    primary.wait_for_a_submitted_batch();
    // More requests stay queued: the batch they would fill waits an hour.
    primary.set(&[("llmbatching.batch_wait", "1h")]);
    std::thread::sleep(Duration::from_millis(500));
    submit(&mut p, 3, "later ");

    let standby = Standby::of(&primary);
    let mut s = connect(standby.port, "postgres");
    primary.wait_for("the standby to replay the queue", SETTLE, || {
        count(&mut s, "SELECT count(*) FROM llmbatching.requests") == 8
    });
    // No launcher or worker on a standby; the read functions work there.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        count(
            &mut s,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'llmbatching%'"
        ),
        0
    );
    let states = count(
        &mut s,
        "SELECT count(DISTINCT llmbatching.llm_status(id)) FROM llmbatching.requests",
    );
    assert_eq!(states, 2, "submitted and queued");
    count(
        &mut s,
        "SELECT count(llmbatching.llm_result(id)) FROM llmbatching.requests",
    );
    s.query("SELECT * FROM llmbatching.llm_worker_status()", &[])
        .unwrap();

    // The primary fails while its batch is at the provider; the standby takes over.
    primary.pg_ctl(&["stop", "-m", "immediate"]);
    standby.pg_ctl(&["promote", "-w", "-t", "60"]);
    let mut s = connect(standby.port, "postgres");
    s.batch_execute("ALTER SYSTEM SET llmbatching.batch_wait = '200ms'")
        .unwrap();
    s.batch_execute("SELECT pg_reload_conf()").unwrap();
    primary.wait_for("the promoted server to answer everything", SETTLE, || {
        completed(&mut s) == 8
    });
    let stats = primary.emulator.stats();
    assert_eq!(stats.batches_created, 2);
    assert!(stats.ran_more_than_once().is_empty());
}

#[test]
fn a_request_its_role_holds_locked_holds_up_no_other_group_or_database() {
    let cluster = Cluster::with_extension(&[]);
    let mut main = cluster.client();
    main.batch_execute("CREATE DATABASE other").unwrap();
    main.batch_execute(
        "CREATE ROLE mallory LOGIN IN ROLE llmbatching_user;
         INSERT INTO llmbatching.model_pauses VALUES ('held', now() + interval '1 hour', 'test')",
    )
    .unwrap();
    let mut other = connect(cluster.port, "other");
    other.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    cluster.wait_for("both workers", SETTLE, || {
        served(&mut main) == ["other", "postgres"]
    });
    // Mallory queues a request and keeps it locked, in a transaction left open.
    let mut mallory = cluster.client_as("mallory");
    mallory
        .batch_execute("SELECT llmbatching.llm_submit('held', 'mine')")
        .unwrap();
    mallory
        .batch_execute("BEGIN; SELECT FROM llmbatching.requests FOR UPDATE")
        .unwrap();
    main.batch_execute("DELETE FROM llmbatching.model_pauses")
        .unwrap();
    // Another model here, and the same model in another database under the same key, go on.
    submit(&mut main, 3, "here ");
    submit_to(&mut other, "held", 3, "there ");
    cluster.wait_for("the other requests' answers", SETTLE, || {
        completed(&mut main) == 3 && completed(&mut other) == 3
    });
    // The held request waits (the claims go on without it), and is never failed meanwhile.
    let held: String = main
        .query_one(
            "SELECT state FROM llmbatching.requests WHERE model = 'held'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, "queued");
    // Released, the held request is sent too.
    mallory.batch_execute("COMMIT").unwrap();
    cluster.wait_for("the held request's answer", SETTLE, || {
        completed(&mut main) == 4
    });
}
