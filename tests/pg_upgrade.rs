//! `pg_upgrade` of a PostgreSQL 15 cluster using llmbatching to PostgreSQL 18: every request is
//! kept (answered, in a batch at the provider, queued), and after `llm_adopt()` (the upgraded
//! cluster has a new system identifier, so the database first takes itself for a copy) the worker
//! carries on; nothing is sent twice.
//!
//! It needs both versions with llmbatching installed, which `scripts/test` has done by the time
//! it runs the PostgreSQL 18 suite; that is the run in which this test works (in the PostgreSQL
//! 15 run it says so and ends).

mod common;

use common::{append_as_owner, pg_bin, pg_command, quick, running_as_root, Cluster};
use std::process::Command;
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(60);
const OLD_PG_CONFIG: &str = "/usr/lib/postgresql/15/bin/pg_config";

fn major_of(pg_config: &str) -> String {
    let out = Command::new(pg_config).arg("--version").output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').next())
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn pg_upgrade_from_15_to_18_keeps_every_request_and_the_worker_carries_on() {
    let new_pg_config = std::env::var("PG_CONFIG").unwrap_or_default();
    if new_pg_config.is_empty() || major_of(&new_pg_config) != "18" {
        eprintln!("pg_upgrade 15 to 18 runs in the PostgreSQL 18 suite (PG_CONFIG names 18 there)");
        return;
    }
    let new_bin = pg_bin();
    // The old cluster: PostgreSQL 15 (this test is the only one of its binary, so the variable
    // is its alone).
    std::env::set_var("PG_CONFIG", OLD_PG_CONFIG);
    let old_bin = pg_bin();
    let cluster = Cluster::start(quick(), &[]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE EXTENSION llmbatching;
         SELECT llmbatching.llm_submit('gpt-4o-mini', 'before ' || g) FROM generate_series(1, 5) g;",
    )
    .unwrap();
    cluster.wait_until_settled(SETTLE);
    cluster.emulator.configure(|e| e.in_progress_ms = 600_000);
    c.batch_execute(
        "SELECT llmbatching.llm_submit('slow-model', 'slow ' || g) FROM generate_series(1, 4) g",
    )
    .unwrap();
    cluster.wait_for_a_submitted_batch();
    c.batch_execute(
        "INSERT INTO llmbatching.model_pauses VALUES ('paused-model', now() + interval '1 hour', 'test');
         SELECT llmbatching.llm_submit('paused-model', 'later ' || g) FROM generate_series(1, 3) g;",
    )
    .unwrap();
    // This machine's PostgreSQL 15 (Debian's 15.20 build) records an option `pg_attver` on every
    // column of every table, which no other build knows: pg_upgrade's restore into 18 refuses
    // it, for any table. Clear it, as anyone upgrading from that build must (README, Upgrades).
    c.batch_execute(
        "UPDATE pg_catalog.pg_attribute SET attoptions = NULL WHERE attoptions::text LIKE '%pg_attver=%'",
    )
    .unwrap();
    drop(c);
    cluster.pg_ctl(&["stop", "-m", "fast", "-w"]);

    // The new cluster: PostgreSQL 18, the same settings, the key file; then pg_upgrade.
    std::env::set_var("PG_CONFIG", &new_pg_config);
    let new_data = cluster.dir.join("data18");
    let mut initdb = pg_command("initdb");
    // PostgreSQL 18 turns data checksums on by default; the 15 cluster has none, and pg_upgrade
    // needs both alike.
    initdb
        .args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--no-data-checksums",
            "-D",
        ])
        .arg(&new_data);
    assert!(initdb.status().unwrap().success());
    // The harness's settings: everything from its first `port = ` line on.
    let old_conf = std::fs::read_to_string(cluster.data().join("postgresql.conf")).unwrap();
    let start = old_conf.find("\nport = ").expect("the harness's settings") + 1;
    append_as_owner(&new_data.join("postgresql.conf"), &old_conf[start..]);
    let key = std::fs::read_to_string(cluster.data().join("llmbatching.key")).unwrap();
    append_as_owner(&new_data.join("llmbatching.key"), &key);
    let mut chmod = if running_as_root() {
        let mut c = Command::new("sudo");
        c.args(["-u", "postgres", "--", "chmod", "600"]);
        c
    } else {
        Command::new("chmod")
    };
    assert!(chmod
        .arg(new_data.join("llmbatching.key"))
        .status()
        .unwrap()
        .success());
    let mut upgrade = pg_command("pg_upgrade");
    upgrade
        .current_dir(&cluster.dir)
        .arg("-b")
        .arg(&old_bin)
        .arg("-B")
        .arg(&new_bin)
        .arg("-d")
        .arg(cluster.data())
        .arg("-D")
        .arg(&new_data)
        .args(["-U", "postgres"]);
    let out = upgrade.output().unwrap();
    assert!(
        out.status.success(),
        "pg_upgrade failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        upgrade_logs(&new_data)
    );
    // The harness serves the directory `data`: the upgraded cluster takes its place.
    let mut swap = if running_as_root() {
        let mut c = Command::new("sudo");
        c.args(["-u", "postgres", "--", "sh", "-c"]);
        c
    } else {
        let mut c = Command::new("sh");
        c.arg("-c");
        c
    };
    let dir = cluster.dir.display().to_string();
    assert!(swap
        .arg(format!(
            "mv '{dir}/data' '{dir}/data15' && mv '{dir}/data18' '{dir}/data'"
        ))
        .status()
        .unwrap()
        .success());
    cluster.pg_ctl(&["start", "-w", "-t", "60"]);

    let mut c = cluster.client();
    let version: String = c.query_one("SHOW server_version", &[]).unwrap().get(0);
    assert!(version.starts_with("18"), "{version}");
    let states: String = c
        .query_one(
            "SELECT string_agg(state || ':' || n, ',' ORDER BY state)
               FROM (SELECT state, count(*) n FROM llmbatching.requests GROUP BY state) s",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(states, "completed:5,queued:3,submitted:4");
    // A new cluster: the database takes itself for a copy until it is adopted.
    let problem: Option<String> = c
        .query_one("SELECT llmbatching.copy_problem()", &[])
        .unwrap()
        .get(0);
    assert!(problem.is_some());
    c.batch_execute("SELECT llmbatching.llm_adopt(); DELETE FROM llmbatching.model_pauses;")
        .unwrap();
    cluster.emulator.configure(|e| e.in_progress_ms = 200);
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"),
        12
    );
    let stats = cluster.emulator.stats();
    assert!(stats.ran_more_than_once().is_empty());
    assert_eq!(
        stats.batches_created as i64,
        cluster
            .count("SELECT count(*) FROM llmbatching.batches WHERE provider_batch_id IS NOT NULL"),
        "a batch was created twice"
    );
}

/// The ends of pg_upgrade's logs, for a failure's message.
fn upgrade_logs(data: &std::path::Path) -> String {
    let mut text = String::new();
    let Ok(runs) = std::fs::read_dir(data.join("pg_upgrade_output.d")) else {
        return text;
    };
    for run in runs.flatten() {
        for log in std::fs::read_dir(run.path().join("log"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let content = std::fs::read_to_string(log.path()).unwrap_or_default();
            let errors = content.lines().filter(|l| {
                l.contains("error") || l.contains("ERROR") || l.starts_with("Command was")
            });
            let tail: Vec<&str> = content.lines().rev().take(5).collect();
            text.push_str(&format!("--- {}\n", log.path().display()));
            for line in errors.chain(tail.into_iter().rev()) {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}
