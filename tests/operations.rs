//! Operating the workers: one per database, started by CREATE EXTENSION where the launcher does
//! not serve the database (also without preloading), listed by llm_worker_status(), restarted by
//! llm_worker_restart(), and never two for one database.

mod common;

use common::{quick, Cluster};
use postgres::Client;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(60);

fn connect(cluster: &Cluster, database: &str) -> Client {
    postgres::Config::new()
        .host("127.0.0.1")
        .port(cluster.port)
        .user("postgres")
        .dbname(database)
        .connect(postgres::NoTls)
        .unwrap()
}

fn workers(c: &mut Client) -> Vec<(i32, String)> {
    c.query(
        "SELECT pid, database::text FROM llmbatching.llm_worker_status()",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn completed(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn each_database_gets_its_own_worker_and_never_two() {
    let cluster = Cluster::start(quick(), &[]);
    let mut main = cluster.client();
    main.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    main.batch_execute("CREATE DATABASE second").unwrap();
    // The launcher serves llmbatching.database (postgres); CREATE EXTENSION starts the worker
    // of any other.
    let mut second = connect(&cluster, "second");
    second
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    cluster.wait_for("a worker for each database", SETTLE, || {
        let mut databases: Vec<String> = workers(&mut main).into_iter().map(|(_, d)| d).collect();
        databases.sort();
        databases == ["postgres", "second"]
    });
    // Asked for another, the database that has one gets none.
    let started: Option<i32> = second
        .query_one("SELECT llmbatching.llm_worker_start()", &[])
        .unwrap()
        .get(0);
    assert_eq!(started, None);
    for c in [&mut main, &mut second] {
        c.batch_execute(
            "SELECT llmbatching.llm_submit('m', 'q' || g) FROM generate_series(1, 5) g",
        )
        .unwrap();
    }
    cluster.wait_for("both databases' answers", SETTLE, || {
        completed(&mut main) == 5 && completed(&mut second) == 5
    });
    // The status says what each does, and this database's batches.
    let row = second
        .query_one(
            "SELECT batches_in_flight FROM llmbatching.llm_worker_status() WHERE database = 'second'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), Some(0));

    // A restarted worker comes back, and goes on serving its database.
    let before: Vec<i32> = workers(&mut second)
        .into_iter()
        .filter(|(_, d)| d == "second")
        .map(|(p, _)| p)
        .collect();
    let restarted: bool = second
        .query_one("SELECT llmbatching.llm_worker_restart()", &[])
        .unwrap()
        .get(0);
    assert!(restarted);
    cluster.wait_for("the worker to come back", SETTLE, || {
        let now: Vec<i32> = workers(&mut second)
            .into_iter()
            .filter(|(_, d)| d == "second")
            .map(|(p, _)| p)
            .collect();
        now.len() == 1 && now != before
    });
    second
        .batch_execute(
            "SELECT llmbatching.llm_submit('m', 'after ' || g) FROM generate_series(1, 3) g",
        )
        .unwrap();
    cluster.wait_for("the answers after the restart", SETTLE, || {
        completed(&mut second) == 8
    });
    // A database dropped under its worker: the worker goes, and is not started again.
    drop(second);
    main.batch_execute("DROP DATABASE second WITH (FORCE)")
        .unwrap();
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        !cluster.log().contains("does not exist"),
        "a worker was started again for the dropped database"
    );
    assert_eq!(workers(&mut main).len(), 1);
    // Only administrators operate the workers.
    main.batch_execute("CREATE ROLE alice LOGIN IN ROLE llmbatching_user")
        .unwrap();
    let mut alice = cluster.client_as("alice");
    for sql in [
        "SELECT * FROM llmbatching.llm_worker_status()",
        "SELECT llmbatching.llm_worker_restart()",
        "SELECT llmbatching.llm_worker_start()",
    ] {
        let err = alice.batch_execute(sql).expect_err(sql);
        assert!(
            err.as_db_error()
                .unwrap()
                .message()
                .contains("permission denied"),
            "{sql}"
        );
    }
}

#[test]
fn without_preloading_create_extension_starts_the_worker() {
    let cluster = Cluster::start(quick(), &[("shared_preload_libraries", "")]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE EXTENSION llmbatching;
         SELECT llmbatching.llm_submit('m', 'unpreloaded ' || g) FROM generate_series(1, 5) g;",
    )
    .unwrap();
    cluster.wait_until_settled(SETTLE);
    assert_eq!(completed(&mut c), 5);
    assert_eq!(workers(&mut c).len(), 1);
    assert!(
        !cluster.log().contains("launcher"),
        "no launcher runs without preloading"
    );
}
