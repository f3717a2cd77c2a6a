//! Upgrades: a database on the previous release (its install script as shipped, in
//! sql/releases/), full of state, updated with `ALTER EXTENSION llmbatching UPDATE`: nothing is
//! lost, the worker carries on, and the result is the same schema as a fresh install.

mod common;

use common::{pg_bin, quick, Cluster};
use postgres::Client;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

const PREVIOUS: &str = "0.1.0";
const SETTLE: Duration = Duration::from_secs(60);

/// Puts the previous release's install script beside the current one in the server's
/// extension directory, so that `CREATE EXTENSION ... VERSION` can install it.
fn install_previous_release() {
    let pg_config = pg_bin().join("pg_config");
    let out = Command::new(&pg_config).arg("--sharedir").output().unwrap();
    let sharedir = String::from_utf8(out.stdout).unwrap();
    let name = format!("llmbatching--{PREVIOUS}.sql");
    let released = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("sql/releases")
        .join(&name);
    std::fs::copy(
        released,
        PathBuf::from(sharedir.trim()).join("extension").join(name),
    )
    .unwrap();
}

/// Every object of schema llmbatching as text, sorted: columns (by name), views, indexes,
/// constraints, functions, triggers, policies and privileges.
fn schema_of(c: &mut Client) -> Vec<String> {
    c.query(
        "WITH ns AS (SELECT 'llmbatching'::regnamespace AS oid)
         SELECT line FROM (
           SELECT 'column ' || r.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                  || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                  || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '') AS line
             FROM pg_class r JOIN pg_attribute a ON a.attrelid = r.oid
             LEFT JOIN pg_attrdef d ON d.adrelid = r.oid AND d.adnum = a.attnum
            WHERE r.relnamespace = (SELECT oid FROM ns) AND a.attnum > 0 AND NOT a.attisdropped
           UNION ALL
           SELECT 'view ' || relname || ' ' || pg_get_viewdef(oid) || coalesce(array_to_string(reloptions, ','), '')
             FROM pg_class WHERE relnamespace = (SELECT oid FROM ns) AND relkind = 'v'
           UNION ALL
           SELECT 'index ' || pg_get_indexdef(indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            WHERE c.relnamespace = (SELECT oid FROM ns)
           UNION ALL
           SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
             FROM pg_constraint WHERE connamespace = (SELECT oid FROM ns)
           UNION ALL
           SELECT 'function ' || pg_get_functiondef(p.oid) || coalesce(array_to_string(p.proacl, ','), '')
             FROM pg_proc p WHERE p.pronamespace = (SELECT oid FROM ns) AND p.prokind IN ('f', 'p')
           UNION ALL
           SELECT 'trigger ' || pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
            WHERE c.relnamespace = (SELECT oid FROM ns) AND NOT t.tgisinternal
           UNION ALL
           SELECT 'policy ' || c.relname || ' ' || p.polname || ' ' || coalesce(pg_get_expr(p.polqual, p.polrelid), '')
                  || ' ' || coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '')
             FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid WHERE c.relnamespace = (SELECT oid FROM ns)
           UNION ALL
           SELECT 'privileges ' || relname || ' ' || coalesce(array_to_string(relacl, ','), '')
             FROM pg_class WHERE relnamespace = (SELECT oid FROM ns)
         ) objects ORDER BY line",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn count(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn an_update_from_the_previous_release_keeps_everything_and_equals_a_fresh_install() {
    install_previous_release();
    let cluster = Cluster::start(quick(), &[]);
    let mut c = cluster.client();
    c.batch_execute(&format!(
        "CREATE EXTENSION llmbatching VERSION '{PREVIOUS}';
         CREATE TABLE notes (id int PRIMARY KEY, body text, summary text);
         INSERT INTO notes SELECT g, 'note ' || g, NULL FROM generate_series(1, 5) g;
         SELECT * FROM llmbatching.llm_classify('notes', 'summary', $$'Summarize: ' || body$$, 'gpt-4o-mini');
         SELECT llmbatching.llm_submit('gpt-4o-mini', 'done ' || g, job => 'done') FROM generate_series(1, 5) g;"
    ))
    .unwrap();
    // As when the new library replaces the old one: the server restarts, and the launcher finds
    // the database with the extension (version 0.1.0 starts no worker at CREATE EXTENSION).
    cluster.restart("fast");
    let mut c = cluster.client();
    cluster.wait_until_settled(SETTLE);
    // The answers wait to be written into their rows until the update (the write-back queue
    // changed shape); they are not lost.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        cluster.count("SELECT count(*) FROM notes WHERE summary IS NOT NULL"),
        0
    );
    assert!(cluster.log().contains(
        "answers are not written back into rows until ALTER EXTENSION llmbatching UPDATE"
    ));
    // Some in a batch at the provider, some queued (their model paused).
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
    let states = "SELECT string_agg(state || ':' || n, ',' ORDER BY state)
                    FROM (SELECT state, count(*) n FROM llmbatching.requests GROUP BY state) s";
    let before: String = c.query_one(states, &[]).unwrap().get(0);
    assert_eq!(before, "completed:10,queued:3,submitted:4");
    let cost_before: String = c
        .query_one("SELECT sum(cost)::text FROM llmbatching.request_costs", &[])
        .unwrap()
        .get(0);

    c.batch_execute("ALTER EXTENSION llmbatching UPDATE")
        .unwrap();
    let version: String = c
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'llmbatching'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let after: String = c.query_one(states, &[]).unwrap().get(0);
    assert_eq!(after, before);
    let cost_after: String = c
        .query_one("SELECT sum(cost)::text FROM llmbatching.request_costs", &[])
        .unwrap()
        .get(0);
    assert_eq!(cost_after, cost_before);
    cluster.wait_for("the answers to be written after the update", SETTLE, || {
        cluster.count("SELECT count(*) FROM notes WHERE summary IS NOT NULL") == 5
    });
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM llmbatching.writebacks WHERE outcome = 'written'"
        ),
        5
    );
    // What the update added works.
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM llmbatching.my_batches WHERE provider IS DISTINCT FROM 'openai'"
        ),
        0
    );
    assert!(count(&mut c, "SELECT count(*) FROM llmbatching.my_batches") > 0);

    // The worker carries on with what was in flight and queued.
    cluster.emulator.configure(|e| e.in_progress_ms = 200);
    c.batch_execute("DELETE FROM llmbatching.model_pauses")
        .unwrap();
    cluster.wait_until_settled(SETTLE);
    assert_eq!(
        count(
            &mut c,
            "SELECT count(*) FROM llmbatching.requests WHERE state = 'completed'"
        ),
        17
    );
    assert!(cluster.emulator.stats().ran_more_than_once().is_empty());

    // The same schema as a fresh install.
    let updated = schema_of(&mut c);
    c.batch_execute("CREATE DATABASE fresh").unwrap();
    let mut fresh = Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=postgres dbname=fresh",
            cluster.port
        ),
        postgres::NoTls,
    )
    .unwrap();
    fresh.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    let installed = schema_of(&mut fresh);
    let only_updated: Vec<&String> = updated.iter().filter(|l| !installed.contains(l)).collect();
    let only_fresh: Vec<&String> = installed.iter().filter(|l| !updated.contains(l)).collect();
    assert!(
        only_updated.is_empty() && only_fresh.is_empty(),
        "the updated schema differs from a fresh install:\nonly after the update: {only_updated:#?}\nonly in a fresh install: {only_fresh:#?}"
    );
}
