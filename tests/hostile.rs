//! Hostile tenants sharing one database: code planted in tables, schemas and settings,
//! forged notifications, oversized backlogs, locks, slow triggers and poisoned answers. Each
//! test asserts that the hostile role gains nothing and that the other roles are served.

mod common;

use common::{quick, Cluster, EmulatorConfig, API_KEY};
use llmbatching_emulator::answers::{echo_answer, nul_answer, NUL_MARKER};
use postgres::{Client, NoTls};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The bound on anything a test waits for.
const BOUND: Duration = Duration::from_secs(120);

/// A cluster with the extension and the users alice, bob and mallory (members of
/// llmbatching_user), each owning a schema of their name, first on their search_path.
fn shared_database(emulator: EmulatorConfig, settings: &[(&str, &str)]) -> Cluster {
    let cluster = Cluster::start(emulator, settings);
    let mut admin = cluster.client();
    admin.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    for role in ["alice", "bob", "mallory"] {
        add_user(&mut admin, role);
    }
    cluster
}

/// Creates a login role in llmbatching_user with a schema of its own.
fn add_user(admin: &mut Client, role: &str) {
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN IN ROLE llmbatching_user;
             CREATE SCHEMA {role} AUTHORIZATION {role};"
        ))
        .unwrap();
}

fn refused(c: &mut Client, sql: &str) -> String {
    let err = c.batch_execute(sql).expect_err(sql);
    err.as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_else(|| err.to_string())
}

fn one<T: for<'a> postgres::types::FromSql<'a>>(c: &mut Client, sql: &str) -> T {
    c.query_one(sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// A connection with startup `options` (such as `-c statement_timeout=0`), which take
/// precedence over database and role settings, and its NOTICEs collected into `notices`.
fn connect(
    cluster: &Cluster,
    user: &str,
    options: &str,
    notices: Option<Arc<Mutex<Vec<String>>>>,
) -> Client {
    let mut config = postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(cluster.port)
        .user(user)
        .dbname("postgres");
    if !options.is_empty() {
        config.options(options);
    }
    if let Some(notices) = notices {
        config.notice_callback(move |n| notices.lock().unwrap().push(n.message().to_owned()));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match config.connect(NoTls) {
            Ok(c) => return c,
            Err(e) if Instant::now() >= deadline => panic!("cannot connect as {user}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Calls `probe` until it answers Ok, failing after `timeout` with the last state it reported.
fn eventually<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(state) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {state}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The condition selecting the write-backs into `table`.
fn into(table: &str) -> String {
    format!("target = '{table}'::regclass")
}

/// (outcome, final: written_at set) of the write-backs matching `condition`, by request id.
fn outcomes(c: &mut Client, condition: &str) -> Vec<(Option<String>, bool)> {
    c.query(
        &format!(
            "SELECT outcome, written_at IS NOT NULL FROM llmbatching.writebacks
              WHERE {condition} ORDER BY request_id"
        ),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Waits until the `n` write-backs matching `condition` are all written.
fn wait_written(c: &mut Client, condition: &str, n: usize, timeout: Duration) {
    eventually(
        &format!("{n} write-backs where {condition} to be written"),
        timeout,
        || {
            let seen = outcomes(c, condition);
            let done = seen.len() == n && seen.iter().all(|(o, _)| o.as_deref() == Some("written"));
            if done {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    )
}

/// Waits until the `n` write-backs matching `condition` all have a final outcome; returns them.
fn wait_final(
    c: &mut Client,
    condition: &str,
    n: usize,
    timeout: Duration,
) -> Vec<(Option<String>, bool)> {
    eventually(
        &format!("{n} write-backs where {condition} to reach a final outcome"),
        timeout,
        || {
            let seen = outcomes(c, condition);
            if seen.len() == n && seen.iter().all(|(o, fin)| *fin && o.is_some()) {
                Ok(seen)
            } else {
                Err(format!("{seen:?}"))
            }
        },
    )
}

/// Creates `table (id int PRIMARY KEY, body text, answer text)` with `rows` rows whose body is
/// `<table> row <n>`: distinct across tables, so no two requests of a test are identical.
fn make_table(c: &mut Client, table: &str, rows: i32) {
    c.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, body text, answer text);
         INSERT INTO {table} (id, body) SELECT g, '{table} row ' || g FROM generate_series(1, {rows}) g;"
    ))
    .unwrap();
}

/// Registers a request for each row of `table`, its answer going into column `answer`;
/// returns how many were submitted.
fn classify(c: &mut Client, table: &str, prompt: &str) -> i64 {
    one(
        c,
        &format!(
            "SELECT submitted FROM llmbatching.llm_classify('{table}', 'answer', $${prompt}$$, 'm')"
        ),
    )
}

/// The answer the emulator gives for row `n` of a table made by [`make_table`] and classified
/// with the prompt `'Classify: ' || body`.
fn expected_row_answer(table: &str, n: i32) -> String {
    echo_answer("m", &format!("Classify: {table} row {n}"))
}

/// Asserts that every row of `table` holds its expected answer.
fn assert_answers(c: &mut Client, table: &str, rows: i32) {
    let got: Vec<(i32, Option<String>)> = c
        .query(
            &format!("SELECT id::int, answer::text FROM {table} ORDER BY id"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got.len(), rows as usize, "rows of {table}");
    for (id, answer) in got {
        assert_eq!(
            answer,
            Some(expected_row_answer(table, id)),
            "row {id} of {table} does not hold its own answer"
        );
    }
}

fn is_superuser(c: &mut Client, role: &str) -> bool {
    c.query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .unwrap()
        .get(0)
}

fn request_states(c: &mut Client, condition: &str) -> Vec<String> {
    c.query(
        &format!("SELECT state FROM llmbatching.requests WHERE {condition} ORDER BY id"),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A request's state and how many times it was sent.
fn state_and_attempts(c: &mut Client, id: i64) -> (String, i32) {
    let row = c
        .query_one(
            "SELECT state, attempts FROM llmbatching.requests WHERE id = $1",
            &[&id],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// Waits until the `n` requests matching `condition` have all completed.
fn wait_completed(c: &mut Client, condition: &str, n: usize, timeout: Duration) {
    eventually(
        &format!("{n} requests where {condition} to complete"),
        timeout,
        || {
            let states = request_states(c, condition);
            if states.len() == n && states.iter().all(|s| s == "completed") {
                Ok(())
            } else {
                Err(format!("{states:?}"))
            }
        },
    )
}

/// Functions that log every call (as a WARNING in the server log and a row of `log_table`,
/// which anyone may insert into) and try to make mallory a superuser with the caller's rights.
fn plant_logger(schema: &str) -> String {
    format!(
        "CREATE TABLE {schema}.plant_calls (what text, by_role name);
         GRANT INSERT ON {schema}.plant_calls TO PUBLIC;
         CREATE FUNCTION {schema}.plant_called(p_what text) RETURNS void LANGUAGE plpgsql AS $f$
         BEGIN
             RAISE WARNING 'planted function % called by %', p_what, current_user;
             BEGIN
                 INSERT INTO {schema}.plant_calls VALUES (p_what, current_user);
             EXCEPTION WHEN OTHERS THEN NULL;
             END;
             BEGIN
                 EXECUTE 'ALTER ROLE mallory SUPERUSER';
             EXCEPTION WHEN OTHERS THEN NULL;
             END;
         END
         $f$;"
    )
}

/// A planted function `schema.name(args)` returning `returns`: logs its call, then answers
/// as `body` (a plpgsql statement list) does.
fn plant(schema: &str, name: &str, args: &str, returns: &str, body: &str) -> String {
    format!(
        "CREATE FUNCTION {schema}.{name}({args}) RETURNS {returns} LANGUAGE plpgsql AS $f$
         BEGIN
             PERFORM {schema}.plant_called('{name}({args})');
             {body}
         END
         $f$;"
    )
}

fn plant_calls(c: &mut Client, schema: &str) -> Vec<String> {
    c.query(
        &format!("SELECT what || ' by ' || by_role FROM {schema}.plant_calls"),
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Makes `dbowner`, a role that is not a superuser, the owner of the database, and has it run
/// `sql` (its `ALTER DATABASE … SET`s take effect in sessions started afterwards).
fn owner_sets_database(cluster: &Cluster, sql: &str) {
    cluster
        .client()
        .batch_execute(
            "CREATE ROLE dbowner LOGIN;
             ALTER DATABASE postgres OWNER TO dbowner;",
        )
        .unwrap();
    cluster.client_as("dbowner").batch_execute(sql).unwrap();
}

/// A trigger on `schema.tarpit` that swallows its time limit (which reaches it as
/// query_canceled, which PL/pgSQL can catch by name) and sleeps again, forever.
fn add_tarpit(c: &mut Client, schema: &str) {
    c.batch_execute(&format!(
        "CREATE FUNCTION {schema}.tarpit() RETURNS trigger LANGUAGE plpgsql AS $f$
         BEGIN
             LOOP
                 BEGIN
                     PERFORM pg_sleep(1000);
                 EXCEPTION WHEN query_canceled THEN
                     NULL;
                 END;
             END LOOP;
         END
         $f$;
         CREATE TRIGGER tarpit BEFORE UPDATE ON {schema}.tarpit
             FOR EACH ROW EXECUTE FUNCTION {schema}.tarpit();"
    ))
    .unwrap();
}

fn worker_starts(cluster: &Cluster) -> usize {
    cluster.log().matches("llmbatching worker started").count()
}

#[test]
fn user_code_run_by_the_write_back_gains_nothing() {
    let cluster = shared_database(quick(), &[]);
    let mut admin = cluster.client();
    let mut mallory = cluster.client_as("mallory");
    // Every door calls escalate(): each way back to the worker's superuser identity is tried
    // in a block of its own and recorded. A `mode=raise` door then fails the write, carrying
    // the tally in its error; a `mode=keep` door lets it go on, its record kept.
    mallory
        .batch_execute(
            "CREATE TABLE mallory.attempts (door_input text, step text, ok boolean,
                                            run_by name, session_role name, pid integer);
             CREATE FUNCTION mallory.escalate(p_input text) RETURNS boolean LANGUAGE plpgsql AS $f$
             DECLARE
                 v_step text;
                 v_ok boolean;
                 v_succeeded integer := 0;
                 v_summary text := '';
             BEGIN
                 FOREACH v_step IN ARRAY ARRAY['RESET ROLE', 'SET ROLE postgres',
                                               'SET SESSION AUTHORIZATION postgres',
                                               'ALTER ROLE mallory SUPERUSER'] LOOP
                     BEGIN
                         EXECUTE v_step;
                         v_ok := true;
                     EXCEPTION WHEN OTHERS THEN
                         v_ok := false;
                     END;
                     IF v_ok THEN
                         v_succeeded := v_succeeded + 1;
                     END IF;
                     INSERT INTO mallory.attempts
                     VALUES (p_input, v_step, v_ok, current_user, session_user, pg_backend_pid());
                     v_summary := v_summary || '[' || v_step || ': '
                                  || CASE WHEN v_ok THEN 'SUCCEEDED' ELSE 'refused' END || '] ';
                 END LOOP;
                 IF p_input LIKE '%mode=raise%' THEN
                     RAISE EXCEPTION 'door ran (% of 4 steps succeeded) for %: %',
                         v_succeeded, p_input, v_summary;
                 END IF;
                 RETURN true;
             END
             $f$;
             CREATE FUNCTION mallory.door_trigger() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
                 PERFORM mallory.escalate(NEW.body);
                 RETURN NEW;
             END
             $f$;
             CREATE FUNCTION mallory.door_check(v text) RETURNS boolean LANGUAGE plpgsql AS $f$
             BEGIN
                 IF v IS NULL THEN
                     RETURN true;
                 END IF;
                 RETURN mallory.escalate(v);
             END
             $f$;
             CREATE DOMAIN mallory.checked_text AS text CHECK (mallory.door_check(VALUE));
             CREATE FUNCTION mallory.door_index(v text) RETURNS text
             LANGUAGE plpgsql IMMUTABLE STRICT AS $f$
             BEGIN
                 PERFORM mallory.escalate(v);
                 RETURN v;
             END
             $f$;
             CREATE FUNCTION mallory.door_policy(v text) RETURNS boolean LANGUAGE plpgsql AS $f$
             BEGIN
                 RETURN mallory.escalate(v);
             END
             $f$;",
        )
        .unwrap();
    let doors = ["trigger", "domain", "index", "policy"];
    let modes = ["keep", "raise"];
    for door in doors {
        for mode in modes {
            let t = format!("mallory.door_{door}_{mode}");
            let answer_type = if door == "domain" {
                "mallory.checked_text"
            } else {
                "text"
            };
            let armed = match door {
                "trigger" => format!(
                    "CREATE TRIGGER door BEFORE UPDATE ON {t}
                         FOR EACH ROW EXECUTE FUNCTION mallory.door_trigger();"
                ),
                "index" => format!("CREATE INDEX ON {t} (mallory.door_index(answer));"),
                "policy" => format!(
                    "ALTER TABLE {t} ENABLE ROW LEVEL SECURITY;
                     ALTER TABLE {t} FORCE ROW LEVEL SECURITY;
                     CREATE POLICY reads ON {t} FOR SELECT USING (true);
                     CREATE POLICY door ON {t} FOR UPDATE
                         USING (mallory.door_policy(body)) WITH CHECK (mallory.door_policy(body));"
                ),
                _ => String::new(),
            };
            mallory
                .batch_execute(&format!(
                    "CREATE TABLE {t} (id int PRIMARY KEY, body text, answer {answer_type});
                     INSERT INTO {t} (id, body) VALUES (1, 'door={door} mode={mode}');
                     {armed}"
                ))
                .unwrap();
        }
    }
    assert_eq!(
        one::<i64>(&mut mallory, "SELECT count(*) FROM mallory.attempts"),
        0,
        "a door ran while mallory set it up"
    );

    let mut bob = cluster.client_as("bob");
    make_table(&mut bob, "bob.tickets", 20);
    for door in doors {
        for mode in modes {
            assert_eq!(
                classify(&mut mallory, &format!("mallory.door_{door}_{mode}"), "body"),
                1
            );
        }
    }
    assert_eq!(
        classify(&mut bob, "bob.tickets", "'Classify: ' || body"),
        20
    );

    wait_written(&mut admin, &into("bob.tickets"), 20, BOUND);
    let mut seen = Vec::new();
    for door in doors {
        for mode in modes {
            let t = format!("mallory.door_{door}_{mode}");
            seen.push((door, mode, wait_final(&mut admin, &into(&t), 1, BOUND)));
        }
    }

    assert!(
        !is_superuser(&mut admin, "mallory"),
        "mallory became a superuser"
    );
    let escalated: Vec<String> = admin
        .query(
            "SELECT door_input || ': ' || step || ' as ' || run_by FROM mallory.attempts WHERE ok",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        escalated.is_empty(),
        "code run by the write-back escaped its role: {escalated:?}"
    );
    for (door, mode, rows) in seen {
        let (outcome, _) = &rows[0];
        let outcome = outcome.as_deref().unwrap_or_default();
        if mode == "raise" {
            assert!(
                outcome.starts_with("error:")
                    && outcome.contains("door ran (0 of 4 steps succeeded)"),
                "the {door} door should have run, been refused every step and failed the write; outcome: {outcome}"
            );
            assert!(
                !outcome.contains("SUCCEEDED"),
                "the {door} door escalated: {outcome}"
            );
        } else {
            assert_eq!(
                outcome, "written",
                "the {door} door refused quietly, so the write should have gone on"
            );
            let refused_steps: i64 = admin
                .query_one(
                    "SELECT count(DISTINCT step) FROM mallory.attempts
                      WHERE door_input LIKE $1 AND NOT ok AND run_by = 'mallory'",
                    &[&format!("%door={door} mode=keep%")],
                )
                .unwrap()
                .get(0);
            assert_eq!(
                refused_steps, 4,
                "the {door} door should have run as mallory during the write and been refused all 4 steps"
            );
            let answer: Option<String> = one(
                &mut admin,
                &format!("SELECT answer::text FROM mallory.door_{door}_keep"),
            );
            assert_eq!(
                answer,
                Some(echo_answer("m", &format!("door={door} mode=keep"))),
                "the {door} door's row lacks its answer"
            );
        }
    }
    assert_answers(&mut admin, "bob.tickets", 20);
}

#[test]
fn a_trigger_cannot_change_the_worker_session() {
    let cluster = shared_database(quick(), &[]);
    let mut admin = cluster.client();
    let worker = cluster.worker_pid();
    admin
        .batch_execute(
            "CREATE SCHEMA mallory_s AUTHORIZATION mallory;
             GRANT USAGE ON SCHEMA mallory_s TO PUBLIC;",
        )
        .unwrap();
    let mut mallory = cluster.client_as("mallory");
    let s = "mallory_s";
    let plants = [
        plant_logger(s),
        plant(s, "now", "", "timestamptz", "RETURN pg_catalog.now();"),
        plant(
            s,
            "clock_timestamp",
            "",
            "timestamptz",
            "RETURN pg_catalog.clock_timestamp();",
        ),
        plant(
            s,
            "format",
            "text, name, name",
            "text",
            "RETURN pg_catalog.format($1, $2, $3);",
        ),
        plant(
            s,
            "cardinality",
            "bigint[]",
            "integer",
            "RETURN pg_catalog.cardinality($1);",
        ),
        plant(
            s,
            "unnest",
            "bigint[]",
            "SETOF bigint",
            "RETURN QUERY SELECT pg_catalog.unnest($1);",
        ),
        plant(
            s,
            "jsonb_build_object",
            "text, bigint",
            "jsonb",
            "RETURN pg_catalog.jsonb_build_object($1, $2);",
        ),
        plant(
            s,
            "bigint_eq",
            "bigint, bigint",
            "boolean",
            "RETURN $1 OPERATOR(pg_catalog.=) $2;",
        ),
        "CREATE OPERATOR mallory_s.= (LEFTARG = bigint, RIGHTARG = bigint, FUNCTION = mallory_s.bigint_eq);"
            .to_string(),
    ];
    mallory.batch_execute(&plants.join("\n")).unwrap();
    // A write-back into this table leaves the session pointed at the planted schema, read-only,
    // with other date formats and timeouts too short for any statement, if it can.
    mallory
        .batch_execute(
            "CREATE TABLE mallory.board (id int PRIMARY KEY, body text, answer text);
             INSERT INTO mallory.board (id, body) VALUES (1, 'mallory board row 1');
             CREATE FUNCTION mallory.poison_session() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
                 PERFORM pg_catalog.set_config('search_path', 'mallory_s, pg_catalog', false);
                 PERFORM pg_catalog.set_config('default_transaction_read_only', 'on', false);
                 PERFORM pg_catalog.set_config('DateStyle', 'SQL, DMY', false);
                 PERFORM pg_catalog.set_config('statement_timeout', '1', false);
                 PERFORM pg_catalog.set_config('lock_timeout', '1', false);
                 PERFORM pg_catalog.set_config('transaction_read_only', 'on', false);
                 BEGIN
                     PERFORM pg_catalog.set_config('llmbatching.api_base', 'http://127.0.0.1:9/v1', false);
                 EXCEPTION WHEN OTHERS THEN NULL;
                 END;
                 RETURN NEW;
             END
             $f$;
             CREATE TRIGGER poison BEFORE UPDATE ON mallory.board
                 FOR EACH ROW EXECUTE FUNCTION mallory.poison_session();",
        )
        .unwrap();
    assert_eq!(classify(&mut mallory, "mallory.board", "body"), 1);
    wait_final(&mut admin, &into("mallory.board"), 1, BOUND);

    let mut bob = cluster.client_as("bob");
    make_table(&mut bob, "bob.tickets", 10);
    assert_eq!(
        classify(&mut bob, "bob.tickets", "'Classify: ' || body"),
        10
    );
    wait_completed(&mut admin, "submitted_by = 'bob'", 10, BOUND);
    wait_written(&mut admin, &into("bob.tickets"), 10, BOUND);
    assert_answers(&mut admin, "bob.tickets", 10);

    let calls = plant_calls(&mut admin, s);
    assert!(calls.is_empty(), "planted functions were called: {calls:?}");
    assert!(
        !cluster.log().contains("planted function"),
        "the server log shows a planted function was called"
    );
    assert!(
        !is_superuser(&mut admin, "mallory"),
        "mallory became a superuser"
    );
    assert_eq!(
        cluster.worker_pid(),
        worker,
        "the worker restarted (or was replaced) after running mallory's trigger"
    );
}

#[test]
fn planted_overloads_in_public_are_never_called() {
    let cluster = shared_database(quick(), &[]);
    let mut admin = cluster.client();
    admin
        .batch_execute(
            "GRANT CREATE ON SCHEMA public TO mallory;
             CREATE TABLE public.admin_table (id int PRIMARY KEY, body text, answer text);
             INSERT INTO public.admin_table (id, body)
                 SELECT g, 'public.admin_table row ' || g FROM generate_series(1, 3) g;",
        )
        .unwrap();
    let mut bob = cluster.client_as("bob");
    bob.batch_execute(
        "CREATE TABLE bob.notes (id bigint PRIMARY KEY, body text, answer text);
         INSERT INTO bob.notes (id, body) SELECT g, 'bob.notes row ' || g FROM generate_series(1, 3) g;",
    )
    .unwrap();

    // Each plant matches some call better than the built-in it shadows (an exact argument type
    // against a polymorphic or variadic one), or equals it and wins if public is searched first.
    let p = "public";
    let plants = [
        plant_logger(p),
        plant(
            p,
            "format",
            "text, name, name",
            "text",
            "RETURN pg_catalog.format($1, $2, $3);",
        ),
        plant(
            p,
            "format",
            "text, regclass, name",
            "text",
            "RETURN pg_catalog.format($1, $2, $3);",
        ),
        plant(
            p,
            "format",
            "text, regprocedure",
            "text",
            "RETURN pg_catalog.format($1, $2);",
        ),
        plant(
            p,
            "format",
            "text, text",
            "text",
            "RETURN pg_catalog.format($1, $2);",
        ),
        plant(
            p,
            "cardinality",
            "bigint[]",
            "integer",
            "RETURN pg_catalog.cardinality($1);",
        ),
        plant(
            p,
            "unnest",
            "bigint[]",
            "SETOF bigint",
            "RETURN QUERY SELECT pg_catalog.unnest($1);",
        ),
        plant(
            p,
            "jsonb_build_object",
            "text, integer",
            "jsonb",
            "RETURN pg_catalog.jsonb_build_object($1, $2);",
        ),
        plant(
            p,
            "jsonb_build_object",
            "text, bigint",
            "jsonb",
            "RETURN pg_catalog.jsonb_build_object($1, $2);",
        ),
        plant(
            p,
            "jsonb_build_object",
            "text, text",
            "jsonb",
            "RETURN pg_catalog.jsonb_build_object($1, $2);",
        ),
        plant(
            p,
            "to_jsonb",
            "text",
            "jsonb",
            "RETURN pg_catalog.to_jsonb($1);",
        ),
        plant(
            p,
            "llm_status",
            "integer",
            "text",
            "RETURN llmbatching.llm_status($1::bigint);",
        ),
        plant(p, "btrim", "text", "text", "RETURN pg_catalog.btrim($1);"),
        plant(
            p,
            "quote_ident",
            "text",
            "text",
            "RETURN pg_catalog.quote_ident($1);",
        ),
    ];
    let mut mallory = cluster.client_as("mallory");
    mallory.batch_execute(&plants.join("\n")).unwrap();

    assert_eq!(
        classify(&mut admin, "public.admin_table", "'Classify: ' || body"),
        3
    );
    wait_written(&mut admin, &into("public.admin_table"), 3, BOUND);
    assert_answers(&mut admin, "public.admin_table", 3);
    let first: Option<String> = one(&mut admin, "SELECT llmbatching.llm_status(1)");
    assert!(first.is_some(), "the superuser cannot read request 1");

    assert_eq!(classify(&mut bob, "bob.notes", "'Classify: ' || body"), 3);
    wait_written(&mut admin, &into("bob.notes"), 3, BOUND);
    assert_answers(&mut admin, "bob.notes", 3);
    let bobs: i64 = one(
        &mut admin,
        "SELECT min(id) FROM llmbatching.requests WHERE submitted_by = 'bob'",
    );
    let status: Option<String> = bob
        .query_one("SELECT llmbatching.llm_status($1)", &[&bobs])
        .unwrap()
        .get(0);
    assert_eq!(status.as_deref(), Some("completed"));

    admin
        .batch_execute("DROP EXTENSION llmbatching; CREATE EXTENSION llmbatching;")
        .unwrap();

    let calls = plant_calls(&mut admin, p);
    assert!(
        calls.is_empty(),
        "planted functions in public were called: {calls:?}"
    );
    assert!(
        !cluster.log().contains("planted function"),
        "the server log shows a planted function was called"
    );
    assert!(
        !is_superuser(&mut admin, "mallory"),
        "mallory became a superuser"
    );
}

#[test]
fn database_and_role_settings_leave_the_worker_serving() {
    let cluster = shared_database(quick(), &[]);
    let mut admin = cluster.client();
    owner_sets_database(
        &cluster,
        "ALTER DATABASE postgres SET default_transaction_read_only = on;
             ALTER DATABASE postgres SET default_transaction_isolation = 'serializable';
             ALTER DATABASE postgres SET DateStyle = 'SQL, DMY';
             ALTER DATABASE postgres SET IntervalStyle = 'sql_standard';
             ALTER DATABASE postgres SET TimeZone = 'Pacific/Chatham';
             ALTER DATABASE postgres SET extra_float_digits = -15;
             ALTER DATABASE postgres SET bytea_output = 'escape';
             ALTER DATABASE postgres SET statement_timeout = '5ms';
             ALTER DATABASE postgres SET lock_timeout = '1ms';
             ALTER DATABASE postgres SET search_path = pg_catalog;",
    );
    // Settings of the worker's own role in this database, as an administrator might leave them
    // for interactive use.
    admin
        .batch_execute(
            "ALTER ROLE postgres IN DATABASE postgres SET statement_timeout = '3ms';
             ALTER ROLE postgres IN DATABASE postgres SET DateStyle = 'German, YMD';
             ALTER ROLE postgres IN DATABASE postgres SET IntervalStyle = 'iso_8601';",
        )
        .unwrap();
    drop(admin);
    cluster.restart("fast");

    // Startup options outrank the database and role settings: the test's own sessions are sane.
    let sane =
        "-c default_transaction_read_only=off -c default_transaction_isolation=read\\ committed \
                -c statement_timeout=0 -c lock_timeout=0 -c search_path=public";
    let mut plain = connect(&cluster, "alice", "-c statement_timeout=0", None);
    assert_eq!(
        one::<String>(&mut plain, "SHOW default_transaction_read_only"),
        "on",
        "the database settings are not in effect; the test proves nothing"
    );
    drop(plain);
    let mut admin = connect(&cluster, "postgres", sane, None);
    let mut alice = connect(&cluster, "alice", sane, None);
    let pid_of = |c: &mut Client| -> Result<i32, String> {
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'llmbatching worker'",
            &[],
        )
        .map_err(|e| e.to_string())?
        .map(|r| r.get(0))
        .ok_or_else(|| "no worker".to_string())
    };
    let worker = eventually("the worker to start", BOUND, || pid_of(&mut admin));

    let prompts: Vec<String> = (1..=5).map(|i| format!("settings request {i}")).collect();
    let ids: Vec<i64> = prompts
        .iter()
        .map(|p| {
            alice
                .query_one("SELECT llmbatching.llm_submit('m', $1)", &[p])
                .unwrap()
                .get(0)
        })
        .collect();
    wait_completed(&mut admin, "submitted_by = 'alice'", 5, BOUND);
    for (id, prompt) in ids.iter().zip(&prompts) {
        let answer: Option<String> = alice
            .query_one("SELECT llmbatching.llm_result($1)", &[id])
            .unwrap()
            .get(0);
        assert_eq!(answer, Some(echo_answer("m", prompt)), "request {id}");
    }
    assert_eq!(
        pid_of(&mut admin).unwrap(),
        worker,
        "the worker restarted while serving"
    );
    let starts = worker_starts(&cluster);
    assert!(
        starts <= 2,
        "the worker started {starts} times over two server starts: it failed under the settings"
    );
}

#[test]
fn an_echoed_key_is_stored_and_logged_nowhere() {
    let cluster = shared_database(
        EmulatorConfig {
            api_key: Some(API_KEY.into()),
            echo_authorization: 3,
            ..quick()
        },
        &[],
    );
    let mut alice = cluster.client_as("alice");
    alice
        .batch_execute(
            "SELECT llmbatching.llm_submit('m', 'echo ' || g) FROM generate_series(1, 5) g",
        )
        .unwrap();
    cluster.wait_until_settled(BOUND);
    assert!(
        cluster.emulator.stats().faults_injected > 0,
        "the emulator never echoed the credentials; the test proves nothing"
    );

    let mut admin = cluster.client();
    let tables: Vec<String> = admin
        .query(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = 'llmbatching'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        tables.iter().any(|t| t == "llmbatching.batches"),
        "{tables:?}"
    );
    let mut echo_stored = false;
    for table in &tables {
        let with_key: i64 = admin
            .query_one(
                &format!("SELECT count(*) FROM {table} x WHERE strpos(x::text, $1) > 0"),
                &[&API_KEY],
            )
            .unwrap()
            .get(0);
        assert_eq!(with_key, 0, "{table} holds the API key");
        let echoes: i64 = one(
            &mut admin,
            &format!(
                "SELECT count(*) FROM {table} x WHERE strpos(x::text, 'Headers received') > 0"
            ),
        );
        echo_stored |= echoes > 0;
    }
    let log = cluster.log();
    assert!(!log.contains(API_KEY), "the server log holds the API key");
    assert!(
        echo_stored || log.contains("Headers received"),
        "the echoed error reached neither the tables nor the log; the test proves nothing"
    );
    let alices: i64 = one(
        &mut alice,
        "SELECT count(*) FROM llmbatching.requests WHERE strpos(coalesce(error, ''), 'Bearer sk') > 0",
    );
    assert_eq!(alices, 0, "a request's error holds a bearer token");
}

#[test]
fn a_forged_notification_makes_no_waiter_report_anything_untrue() {
    let cluster = shared_database(quick(), &[("llmbatching.batch_wait", "1h")]);
    let mut alice = cluster.client_as("alice");
    alice
        .batch_execute(
            "SELECT llmbatching.llm_submit('m', 'alice waits ' || g, job => 'alice-job')
               FROM generate_series(1, 3) g",
        )
        .unwrap();
    let notices = Arc::new(Mutex::new(Vec::new()));
    let mut waiter = connect(&cluster, "alice", "", Some(notices.clone()));
    let started = Instant::now();
    let wait = std::thread::spawn(move || {
        waiter
            .query_one(
                "SELECT llmbatching.llm_wait(job => 'alice-job', timeout => '3 seconds')",
                &[],
            )
            .map(|r| r.get::<_, bool>(0))
    });
    let mut bob = cluster.client_as("bob");
    let mut forged = 0;
    while !wait.is_finished() && started.elapsed() < Duration::from_secs(30) {
        bob.batch_execute(
            "NOTIFY llmbatching_job, 'alice-job';
             NOTIFY llmbatching, 'alice-job';
             SELECT pg_notify('llmbatching_' || (SELECT oid FROM pg_roles WHERE rolname = 'alice'), '');
             SELECT pg_notify('llmbatching_' || (SELECT oid FROM pg_roles WHERE rolname = 'alice'), 'alice-job');",
        )
        .unwrap();
        forged += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let finished = wait.join().unwrap().expect("llm_wait runs");
    assert!(forged > 0, "no notification was forged");
    assert!(
        !finished,
        "llm_wait reported alice's job finished after forged notifications"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "llm_wait returned before its timeout"
    );
    let notices = notices.lock().unwrap().clone();
    for claim in ["1 of 3", "2 of 3", "3 of 3"] {
        assert!(
            notices.iter().all(|n| !n.contains(claim)),
            "llm_wait reported progress that did not happen: {notices:?}"
        );
    }
    let states = request_states(&mut cluster.client(), "job = 'alice-job'");
    assert_eq!(
        states,
        ["queued", "queued", "queued"],
        "alice's requests moved"
    );
}

#[test]
fn a_role_with_a_backlog_leaves_room_for_another() {
    let cluster = shared_database(
        EmulatorConfig {
            in_progress_ms: 30_000,
            ..quick()
        },
        &[
            ("llmbatching.batch_max_requests", "100"),
            ("llmbatching.max_batches_in_flight", "4"),
            ("llmbatching.max_batches_per_role", "2"),
            ("llmbatching.batch_wait", "200ms"),
        ],
    );
    let mut admin = cluster.client();
    let mut alice = cluster.client_as("alice");
    let submitted: i64 = one(
        &mut alice,
        "SELECT count(llmbatching.llm_submit('m', 'alice backlog ' || g)) FROM generate_series(1, 10000) g",
    );
    assert_eq!(submitted, 10_000);

    let mut most_alice = 0i64;
    let mut sample = |admin: &mut Client| {
        let open: i64 = one(
            admin,
            "SELECT count(DISTINCT batch_id) FROM llmbatching.requests
              WHERE submitted_by = 'alice' AND state = 'submitted'",
        );
        assert!(
            open <= 2,
            "alice holds {open} open batches; llmbatching.max_batches_per_role is 2"
        );
        most_alice = most_alice.max(open);
    };
    for _ in 0..10 {
        sample(&mut admin);
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut bob = cluster.client_as("bob");
    bob.batch_execute(
        "SELECT llmbatching.llm_submit('m', 'bob request ' || g) FROM generate_series(1, 10) g",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        sample(&mut admin);
        let bob_sent: i64 = one(
            &mut admin,
            "SELECT count(*) FROM llmbatching.requests
              WHERE submitted_by = 'bob' AND state IN ('submitted', 'completed')",
        );
        if bob_sent > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bob's requests were not sent within 60 s behind alice's backlog"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..10 {
        sample(&mut admin);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        most_alice >= 1,
        "no batch of alice's was ever seen at the provider; the test proves nothing"
    );
}

#[test]
fn poisoned_inputs_and_answers_stay_with_their_own_request() {
    let cluster = shared_database(quick(), &[]);
    let worker = cluster.worker_pid();
    let mut alice = cluster.client_as("alice");
    let message = refused(
        &mut alice,
        "SELECT llmbatching.llm_submit('m', 'x', job => repeat('j', 9000))",
    );
    assert!(
        message.contains("invalid argument \"job\""),
        "a 9,000-byte job name: {message}"
    );
    let message = refused(
        &mut alice,
        "SELECT llmbatching.llm_submit('m', 'x', job => repeat('é', 101))",
    );
    assert!(
        message.contains("invalid argument \"job\""),
        "a job name of 101 characters and 202 bytes: {message}"
    );

    let nul_prompt = format!("alice asks for a NUL {NUL_MARKER}");
    let alice_prompts = [
        nul_prompt.clone(),
        "alice plain request".to_string(),
        r"alice's literal \u0000 stays six characters".to_string(),
    ];
    let alice_ids: Vec<i64> = alice_prompts
        .iter()
        .map(|p| {
            alice
                .query_one(
                    "SELECT llmbatching.llm_submit('m', $1, job => repeat('j', 200))",
                    &[p],
                )
                .unwrap()
                .get(0)
        })
        .collect();
    let mut bob = cluster.client_as("bob");
    let bob_prompts: Vec<String> = (1..=5).map(|i| format!("bob plain request {i}")).collect();
    let bob_ids: Vec<i64> = bob_prompts
        .iter()
        .map(|p| {
            bob.query_one("SELECT llmbatching.llm_submit('m', $1)", &[p])
                .unwrap()
                .get(0)
        })
        .collect();
    cluster.wait_until_settled(BOUND);

    let check = |c: &mut Client, id: i64, expected: String| {
        let row = c
            .query_one(
                "SELECT llmbatching.llm_status($1), llmbatching.llm_result($1)",
                &[&id],
            )
            .unwrap();
        assert_eq!(
            row.get::<_, Option<String>>(0).as_deref(),
            Some("completed"),
            "request {id}"
        );
        assert_eq!(
            row.get::<_, Option<String>>(1),
            Some(expected),
            "request {id} does not hold its own answer"
        );
    };
    let nul_expected = nul_answer("m", &nul_prompt).replace('\0', "\u{FFFD}");
    assert!(nul_expected.contains('\u{FFFD}'));
    check(&mut alice, alice_ids[0], nul_expected);
    for (id, prompt) in alice_ids.iter().zip(&alice_prompts).skip(1) {
        check(&mut alice, *id, echo_answer("m", prompt));
    }
    for (id, prompt) in bob_ids.iter().zip(&bob_prompts) {
        check(&mut bob, *id, echo_answer("m", prompt));
    }
    assert_eq!(
        cluster.worker_pid(),
        worker,
        "the worker restarted on a poisoned answer"
    );
}

#[test]
fn a_held_lock_or_slow_trigger_delays_only_its_owner() {
    let cluster = shared_database(
        quick(),
        &[
            ("llmbatching.write_back_lock_timeout", "200ms"),
            ("llmbatching.write_back_timeout", "1s"),
            ("llmbatching.batch_wait", "1h"),
        ],
    );
    let mut admin = cluster.client();
    let mut mallory = cluster.client_as("mallory");
    make_table(&mut mallory, "mallory.t1", 3);
    make_table(&mut mallory, "mallory.t2", 3);
    mallory
        .batch_execute(
            "CREATE FUNCTION mallory.dawdle() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
                 PERFORM pg_sleep(30);
                 RETURN NEW;
             END
             $f$;
             CREATE TRIGGER dawdle BEFORE UPDATE ON mallory.t2
                 FOR EACH ROW EXECUTE FUNCTION mallory.dawdle();",
        )
        .unwrap();
    let mut bob = cluster.client_as("bob");
    make_table(&mut bob, "bob.tickets", 10);
    let prompt = "'Classify: ' || body";
    assert_eq!(classify(&mut mallory, "mallory.t1", prompt), 3);
    assert_eq!(classify(&mut mallory, "mallory.t2", prompt), 3);
    assert_eq!(classify(&mut bob, "bob.tickets", prompt), 10);

    let mut locker = cluster.client_as("mallory");
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute("LOCK TABLE mallory.t1 IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    cluster.set(&[("llmbatching.batch_wait", "0")]);

    wait_written(
        &mut admin,
        &into("bob.tickets"),
        10,
        Duration::from_secs(60),
    );
    assert_answers(&mut admin, "bob.tickets", 10);
    eventually(
        "mallory's locked write-backs to wait",
        Duration::from_secs(60),
        || {
            let seen = outcomes(&mut admin, &into("mallory.t1"));
            let waiting = seen.len() == 3
                && seen.iter().all(|(o, fin)| {
                    !fin && o.as_deref().is_some_and(|o| o.starts_with("waiting:"))
                });
            if waiting {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        },
    );
    // Registering a waiting write-back again, over and over, never queues it again: it keeps
    // its one entry, with its count and its pause.
    let (id, key): (i64, serde_json::Value) = {
        let row = mallory
            .query_one(
                "SELECT request_id, row_key FROM llmbatching.writebacks WHERE target = 'mallory.t1'::regclass LIMIT 1",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    for _ in 0..20 {
        mallory
            .execute(
                "SELECT llm_write_back($1, 'mallory.t1', 'answer', $2)",
                &[&id, &key],
            )
            .unwrap();
    }
    let entries: i64 = admin
        .query_one(
            "SELECT count(*) FROM llmbatching.writeback_queue WHERE $1 = ANY (request_ids)",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert_eq!(entries, 1, "registering again queued the answer again");
    // Registered for another row or table, it starts afresh there: written at once, whatever
    // its tries at the locked table; registered back, it waits for that table again.
    make_table(&mut mallory, "mallory.t3", 3);
    mallory
        .execute(
            "SELECT llm_write_back($1, 'mallory.t3', 'answer', $2)",
            &[&id, &key],
        )
        .unwrap();
    wait_written(&mut admin, &into("mallory.t3"), 1, Duration::from_secs(60));
    mallory
        .execute(
            "SELECT llm_write_back($1, 'mallory.t1', 'answer', $2)",
            &[&id, &key],
        )
        .unwrap();
    let slow = eventually(
        "the slow trigger's write-backs to be tried",
        Duration::from_secs(60),
        || {
            let seen = outcomes(&mut admin, &into("mallory.t2"));
            if seen.len() == 3 && seen.iter().all(|(o, _)| o.is_some()) {
                Ok(seen)
            } else {
                Err(format!("{seen:?}"))
            }
        },
    );
    let stopped_in_time = |o: &str| {
        o.starts_with("waiting:")
            || (o.starts_with("error:")
                && (o.contains("timeout") || o.contains("canceling statement")))
    };
    for (outcome, _) in &slow {
        let outcome = outcome.as_deref().unwrap_or_default();
        assert!(
            stopped_in_time(outcome),
            "a write-back into a table whose trigger sleeps 30 s should wait or fail on the time limit; outcome: {outcome}"
        );
    }

    lock.commit().unwrap();
    wait_written(&mut admin, &into("mallory.t1"), 3, Duration::from_secs(60));
    assert_answers(&mut admin, "mallory.t1", 3);
    for (outcome, _) in outcomes(&mut admin, &into("mallory.t2")) {
        let outcome = outcome.unwrap_or_default();
        assert!(
            outcome != "written" && stopped_in_time(&outcome),
            "the slow trigger's write-back: {outcome}"
        );
    }
    assert_eq!(
        one::<i64>(
            &mut admin,
            "SELECT count(*) FROM mallory.t2 WHERE answer IS NOT NULL"
        ),
        0,
        "a write past the time limit was kept"
    );
}

#[test]
fn dropped_tables_and_roles_do_not_stop_the_worker() {
    let cluster = shared_database(
        EmulatorConfig {
            in_progress_ms: 3000,
            ..quick()
        },
        &[],
    );
    let mut admin = cluster.client();
    let worker = cluster.worker_pid();
    add_user(&mut admin, "eve");
    let prompt = "'Classify: ' || body";

    let mut mallory = cluster.client_as("mallory");
    make_table(&mut mallory, "mallory.doomed", 3);
    let mut eve = cluster.client_as("eve");
    make_table(&mut eve, "eve.notes", 3);
    let mut bob = cluster.client_as("bob");
    make_table(&mut bob, "bob.tickets", 5);
    make_table(&mut bob, "bob.later", 5);

    assert_eq!(classify(&mut mallory, "mallory.doomed", prompt), 3);
    assert_eq!(classify(&mut eve, "eve.notes", prompt), 3);
    assert_eq!(classify(&mut bob, "bob.tickets", prompt), 5);
    drop(eve);
    mallory.batch_execute("DROP TABLE mallory.doomed").unwrap();
    admin
        .batch_execute(
            "REASSIGN OWNED BY eve TO postgres;
             DROP OWNED BY eve;
             DROP ROLE eve;",
        )
        .unwrap();
    let early = request_states(&mut admin, "submitted_by IN ('mallory', 'eve')");
    assert!(
        early.iter().all(|s| s == "queued" || s == "submitted"),
        "answers arrived before the drops; the test proves nothing: {early:?}"
    );

    cluster.wait_until_settled(BOUND);
    wait_written(&mut admin, &into("bob.tickets"), 5, BOUND);
    assert_answers(&mut admin, "bob.tickets", 5);
    for role in ["mallory", "eve"] {
        let condition = format!("submitted_by = '{role}'");
        let n = outcomes(&mut admin, &condition).len();
        for (outcome, _) in wait_final(&mut admin, &condition, n, BOUND) {
            assert_ne!(
                outcome.as_deref(),
                Some("written"),
                "{role}'s write-back was written though its {}",
                if role == "eve" {
                    "role is gone"
                } else {
                    "table is gone"
                }
            );
        }
    }
    assert_eq!(
        one::<i64>(
            &mut admin,
            "SELECT count(*) FROM eve.notes WHERE answer IS NOT NULL"
        ),
        0,
        "answers of a dropped role were written into the table it left behind"
    );

    assert_eq!(classify(&mut bob, "bob.later", prompt), 5);
    wait_written(&mut admin, &into("bob.later"), 5, BOUND);
    assert_answers(&mut admin, "bob.later", 5);
    assert_eq!(
        cluster.worker_pid(),
        worker,
        "the worker restarted over a dropped table or role"
    );
}

#[test]
fn batch_details_of_other_roles_stay_private() {
    let cluster = shared_database(quick(), &[("llmbatching.batch_wait", "1h")]);
    let mut alice = cluster.client_as("alice");
    let mut bob = cluster.client_as("bob");
    alice
        .batch_execute("SELECT llmbatching.llm_submit('m', 'alice private ' || g) FROM generate_series(1, 3) g")
        .unwrap();
    bob.batch_execute(
        "SELECT llmbatching.llm_submit('m', 'bob private ' || g) FROM generate_series(1, 5) g;
         SELECT llmbatching.llm_submit('m2', 'bob alone ' || g) FROM generate_series(1, 4) g;",
    )
    .unwrap();
    // Submitted within one batching window, so the requests of model m can share a batch.
    cluster.set(&[("llmbatching.batch_wait", "500ms")]);
    cluster.wait_until_settled(BOUND);
    let shared: i64 = one(
        &mut cluster.client(),
        "SELECT count(*) FROM (SELECT batch_id FROM llmbatching.requests
                                 WHERE submitted_by IN ('alice', 'bob') GROUP BY batch_id
                                HAVING count(DISTINCT submitted_by) = 2) s",
    );
    assert!(
        shared > 0,
        "no batch carried both alice's and bob's requests; the test proves nothing"
    );

    for (client, role, own, completed) in
        [(&mut alice, "alice", 3i64, 3i64), (&mut bob, "bob", 9, 9)]
    {
        let message = refused(client, "SELECT * FROM llmbatching.batches");
        assert!(
            message.contains("permission denied"),
            "{role} reads llmbatching.batches: {message}"
        );
        let row = client
            .query_one(
                "SELECT coalesce(sum(requests), 0)::bigint, coalesce(sum(completed), 0)::bigint, count(*)
                   FROM llmbatching.my_batches",
                &[],
            )
            .unwrap();
        assert_eq!(
            row.get::<_, i64>(0),
            own,
            "{role}'s my_batches counts requests that are not {role}'s"
        );
        assert_eq!(
            row.get::<_, i64>(1),
            completed,
            "{role}'s completed requests"
        );
        let batches: i64 = one(
            &mut cluster.client(),
            &format!(
                "SELECT count(DISTINCT batch_id) FROM llmbatching.requests WHERE submitted_by = '{role}'"
            ),
        );
        assert_eq!(
            row.get::<_, i64>(2),
            batches,
            "{role} sees batches that carry none of {role}'s requests"
        );
    }
}

#[test]
fn code_that_swallows_its_time_limit_cannot_hold_the_worker() {
    let cluster = shared_database(
        quick(),
        &[
            ("llmbatching.write_back_timeout", "1s"),
            ("llmbatching.write_back_lock_timeout", "200ms"),
        ],
    );
    let mut admin = cluster.client();
    let mut mallory = cluster.client_as("mallory");
    make_table(&mut mallory, "mallory.tarpit", 1);
    add_tarpit(&mut mallory, "mallory");
    assert_eq!(classify(&mut mallory, "mallory.tarpit", "body"), 1);
    eventually("mallory's write-back to be tried", BOUND, || {
        let tries: Option<i32> = admin
            .query_one(
                "SELECT max(tries) FROM llmbatching.writeback_queue WHERE submitted_by = 'mallory'",
                &[],
            )
            .unwrap()
            .get(0);
        match tries {
            Some(t) if t >= 1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    let mut bob = cluster.client_as("bob");
    make_table(&mut bob, "bob.tickets", 5);
    assert_eq!(classify(&mut bob, "bob.tickets", "'Classify: ' || body"), 5);
    wait_written(&mut admin, &into("bob.tickets"), 5, BOUND);
    assert_answers(&mut admin, "bob.tickets", 5);

    let outcome = outcomes(&mut admin, &into("mallory.tarpit"));
    assert_ne!(
        outcome[0].0.as_deref(),
        Some("written"),
        "the tarpit's write went through"
    );
    assert!(
        cluster.log().contains("terminating background worker"),
        "the watchdog never had to act; the test proves nothing"
    );
    // The attempt that ended the worker was counted before it ran: the entry is tried again
    // later with a growing pause (or given up), never at once forever.
    let queued: Option<(i32, bool)> = admin
        .query_opt(
            "SELECT tries, due_at > now() FROM llmbatching.writeback_queue WHERE submitted_by = 'mallory'",
            &[],
        )
        .unwrap()
        .map(|r| (r.get(0), r.get(1)));
    if let Some((tries, _)) = queued {
        assert!(
            tries >= 1,
            "the attempt that ended the worker was not counted"
        );
    }
    // Each try the watchdog ended ran out of time: after five, the write-back is given up,
    // rather than tried thirty times, each ending a writer.
    eventually(
        "mallory's write-back to be given up",
        Duration::from_secs(180),
        || {
            let outcome = outcomes(&mut admin, &into("mallory.tarpit"))[0].0.clone();
            match outcome.as_deref() {
                Some("error: gave up after 5 tries that ran out of time") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    );
    let ended = cluster
        .log()
        .matches("terminating background worker")
        .count();
    assert!(ended <= 5, "the watchdog ended {ended} writers");
}

#[test]
fn a_role_whose_code_ends_the_writer_does_not_go_first_each_time() {
    let cluster = shared_database(
        quick(),
        &[
            ("llmbatching.write_back_timeout", "1s"),
            ("llmbatching.write_back_lock_timeout", "200ms"),
            ("llmbatching.batch_wait", "1h"),
        ],
    );
    let mut admin = cluster.client();
    // Bob's answers and aaron's arrive together. Aaron comes first by name; his table's
    // trigger swallows its time limit, so each attempt at it ends the writer (the watchdog),
    // and his answers are more than one attempt takes.
    let mut bob = cluster.client_as("bob");
    make_table(&mut bob, "bob.tickets", 5);
    assert_eq!(classify(&mut bob, "bob.tickets", "'Classify: ' || body"), 5);
    add_user(&mut admin, "aaron");
    let mut aaron = cluster.client_as("aaron");
    make_table(&mut aaron, "aaron.tarpit", 30_000);
    add_tarpit(&mut aaron, "aaron");
    assert_eq!(classify(&mut aaron, "aaron.tarpit", "body"), 30_000);
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    wait_written(&mut admin, &into("bob.tickets"), 5, BOUND);
    assert_answers(&mut admin, "bob.tickets", 5);
    // Each writer that follows one the watchdog ended starts after aaron: bob waits for one
    // of aaron's attempts, not for every one his answers fill.
    let ended = cluster
        .log()
        .matches("terminating background worker")
        .count();
    assert!(
        ended <= 2,
        "bob's answers waited for {ended} writers that aaron's code ended"
    );
}

#[test]
fn code_that_asks_errors_to_end_the_process_fails_only_its_own_write() {
    let cluster = shared_database(quick(), &[]);
    // A database owner who is not a superuser asks every error to end its session.
    owner_sets_database(&cluster, "ALTER DATABASE postgres SET exit_on_error = on");
    cluster.restart("fast");
    let sane = "-c exit_on_error=off";
    let mut admin = connect(&cluster, "postgres", sane, None);
    let mut mallory = connect(&cluster, "mallory", sane, None);
    let mut bob = connect(&cluster, "bob", sane, None);
    let worker = cluster.worker_pid();
    let log_start = cluster.log().len();

    // Mallory's trigger asks the same, in its own code, and then fails.
    make_table(&mut mallory, "mallory.boom", 3);
    mallory
        .batch_execute(
            "CREATE FUNCTION mallory.boom() RETURNS trigger LANGUAGE plpgsql AS $f$
             BEGIN
                 PERFORM pg_catalog.set_config('exit_on_error', 'on', true);
                 PERFORM pg_catalog.set_config('exit_on_error', 'on', false);
                 RAISE EXCEPTION 'mallory boom';
             END
             $f$;
             CREATE TRIGGER boom BEFORE UPDATE ON mallory.boom
                 FOR EACH ROW EXECUTE FUNCTION mallory.boom();",
        )
        .unwrap();
    let prompt = "'Classify: ' || body";
    assert_eq!(classify(&mut mallory, "mallory.boom", prompt), 3);
    // Bob's answers do not fit his column: an ordinary error, under the database's setting.
    bob.batch_execute(
        "CREATE TABLE bob.numbers (id int PRIMARY KEY, body text, answer int);
         INSERT INTO bob.numbers VALUES (1, 'bob number 1', NULL), (2, 'bob number 2', NULL);",
    )
    .unwrap();
    assert_eq!(classify(&mut bob, "bob.numbers", prompt), 2);
    make_table(&mut bob, "bob.tickets", 5);
    assert_eq!(classify(&mut bob, "bob.tickets", prompt), 5);

    for (outcome, _) in wait_final(&mut admin, &into("mallory.boom"), 3, BOUND) {
        let outcome = outcome.unwrap_or_default();
        // Her code fails where it asks (or, failing that, where it raises): her write alone.
        assert!(
            outcome.starts_with("error:")
                && (outcome.contains("exit_on_error") || outcome.contains("mallory boom")),
            "mallory's failing trigger: {outcome}"
        );
    }
    for (outcome, _) in wait_final(&mut admin, &into("bob.numbers"), 2, BOUND) {
        let outcome = outcome.unwrap_or_default();
        assert!(
            outcome.starts_with("error:"),
            "bob's misfit answer: {outcome}"
        );
    }
    wait_written(&mut admin, &into("bob.tickets"), 5, BOUND);
    assert_answers(&mut admin, "bob.tickets", 5);
    let log = cluster.log().split_off(log_start);
    assert!(
        !log.contains("FATAL:  mallory boom") && !log.contains("FATAL:  invalid input syntax"),
        "an error in a role's code ended a process of the worker"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("llmbatching") && l.contains("exited with exit code 1")),
        "a process of the worker exited on an error"
    );
    assert_eq!(cluster.worker_pid(), worker, "the worker restarted");
}

#[test]
fn requests_a_role_keeps_locked_hold_up_only_that_role() {
    // Batches stay in flight long enough to lock a request of one before it is read back.
    let cluster = shared_database(
        EmulatorConfig {
            in_progress_ms: 4000,
            ..quick()
        },
        &[("llmbatching.batch_wait", "1h")],
    );
    let mut admin = cluster.client();
    let mut mallory = cluster.client_as("mallory");
    let mut alice = cluster.client_as("alice");
    let submit = |c: &mut Client, model: &str, prompt: &str| -> i64 {
        c.query_one("SELECT llmbatching.llm_submit($1, $2)", &[&model, &prompt])
            .unwrap()
            .get(0)
    };
    let mut locker = cluster.client_as("mallory");

    // A queued request of mallory's, held locked: the claim takes alice's without it.
    let held_queued = submit(&mut mallory, "shared", "mallory's queued request");
    let alice_queued = submit(&mut alice, "shared", "alice's request beside a held one");
    let mut lock = locker.transaction().unwrap();
    lock.execute(
        "SELECT id FROM llmbatching.requests WHERE id = $1 FOR UPDATE",
        &[&held_queued],
    )
    .unwrap();
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    wait_completed(
        &mut admin,
        &format!("id = {alice_queued}"),
        1,
        Duration::from_secs(40),
    );
    assert_eq!(state_and_attempts(&mut admin, held_queued).0, "queued");
    lock.commit().unwrap();
    wait_completed(&mut admin, &format!("id = {held_queued}"), 1, BOUND);

    // Requests of mallory's in flight, held locked while their batch is read back: one to be
    // answered, one to fail with a write-back to settle. Alice's answer in the same batch is
    // stored all the same; mallory's wait for her, and none is sent twice.
    cluster.set(&[("llmbatching.batch_wait", "1h")]);
    let held_answered = submit(&mut mallory, "shared2", "mallory's request in flight");
    mallory
        .batch_execute(
            "CREATE TABLE mallory.failing (id int PRIMARY KEY, body text, answer text);
             INSERT INTO mallory.failing VALUES (1, 'EMULATOR_FAIL mallory', NULL);
             SELECT llmbatching.llm_classify('mallory.failing', 'answer', 'body', 'shared2');",
        )
        .unwrap();
    let held_failing: i64 = one(
        &mut admin,
        "SELECT request_id FROM llmbatching.writebacks WHERE target = 'mallory.failing'::regclass",
    );
    // And a request of hers with two identical ones waiting on it, one of which she holds.
    let row = mallory
        .query_one(
            "SELECT llmbatching.llm_submit('shared2', 'thrice'), llmbatching.llm_submit('shared2', 'thrice'),
                    llmbatching.llm_submit('shared2', 'thrice')",
            &[],
        )
        .unwrap();
    let (leader, follower, held_follower): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let alice_in_flight = submit(&mut alice, "shared2", "alice's request beside held ones");
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    eventually("the batch to be in flight", BOUND, || {
        let states: Vec<String> = [held_answered, held_failing, leader, alice_in_flight]
            .iter()
            .map(|id| state_and_attempts(&mut admin, *id).0)
            .collect();
        if states.iter().all(|s| s == "submitted") {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    });
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute(&format!(
        "SELECT id FROM llmbatching.requests WHERE id IN ({held_answered}, {held_follower}) FOR UPDATE;
         SELECT request_id FROM llmbatching.writebacks WHERE request_id = {held_failing} FOR UPDATE;"
    ))
    .unwrap();
    wait_completed(
        &mut admin,
        &format!("id = {alice_in_flight}"),
        1,
        Duration::from_secs(40),
    );
    assert_eq!(state_and_attempts(&mut admin, held_answered).0, "submitted");
    assert_eq!(state_and_attempts(&mut admin, held_failing).0, "submitted");
    assert_eq!(state_and_attempts(&mut admin, leader).0, "submitted");
    assert_eq!(state_and_attempts(&mut admin, follower).0, "queued");
    // The batch ends all the same, so it counts against no one's open batches and is not read
    // again: the answers of the three requests mallory holds (the follower's leader among them)
    // are kept aside, where no role can read them.
    eventually(
        "the batch to end with mallory's answers kept",
        BOUND,
        || {
            let row = admin
            .query_one(
                "SELECT b.state, (SELECT pg_catalog.array_agg(h.request_id ORDER BY h.request_id)
                                    FROM llmbatching.held_answers h WHERE h.batch_id = b.id)
                   FROM llmbatching.batches b
                   JOIN llmbatching.requests r ON r.batch_id = b.id WHERE r.id = $1",
                &[&held_answered],
            )
            .unwrap();
            let (state, kept): (String, Option<Vec<i64>>) = (row.get(0), row.get(1));
            let mut expected = vec![held_answered, held_failing, leader];
            expected.sort();
            if state == "done" && kept.as_ref() == Some(&expected) {
                Ok(())
            } else {
                Err(format!("{state}, kept {kept:?}"))
            }
        },
    );
    for role in [&mut mallory, &mut alice] {
        let message = refused(role, "SELECT * FROM llmbatching.held_answers");
        assert!(message.contains("permission denied"), "{message}");
    }
    lock.commit().unwrap();
    wait_completed(
        &mut admin,
        &format!("id IN ({held_answered}, {leader}, {follower}, {held_follower})"),
        4,
        BOUND,
    );
    eventually(
        "mallory's failing request to fail",
        BOUND,
        || match state_and_attempts(&mut admin, held_failing).0.as_str() {
            "failed" => Ok(()),
            other => Err(other.to_string()),
        },
    );
    for id in [
        held_queued,
        held_answered,
        held_failing,
        leader,
        alice_in_flight,
    ] {
        assert_eq!(
            state_and_attempts(&mut admin, id).1,
            1,
            "request {id} was sent more than once"
        );
    }
    let twice = cluster.emulator.stats().ran_more_than_once();
    assert!(
        twice.is_empty(),
        "the provider ran these more than once: {twice:?}"
    );
    assert_eq!(
        wait_final(&mut admin, &into("mallory.failing"), 1, BOUND)[0]
            .0
            .as_deref(),
        Some("request failed")
    );
    eventually("the kept answers to be cleared", BOUND, || {
        match one::<i64>(&mut admin, "SELECT count(*) FROM llmbatching.held_answers") {
            0 => Ok(()),
            left => Err(format!("{left} left")),
        }
    });
}

#[test]
fn a_batch_that_expires_ends_while_a_role_holds_one_of_its_requests() {
    // The first batch expires with nothing run; mallory holds her request in it meanwhile.
    let cluster = shared_database(
        EmulatorConfig {
            in_progress_ms: 4000,
            expire_next: 1,
            expire_fraction: 0.0,
            ..quick()
        },
        &[("llmbatching.batch_wait", "1h")],
    );
    let mut admin = cluster.client();
    let submit = |c: &mut Client, prompt: &str| -> i64 {
        c.query_one("SELECT llmbatching.llm_submit('shared', $1)", &[&prompt])
            .unwrap()
            .get(0)
    };
    let held = submit(&mut cluster.client_as("mallory"), "held through an expiry");
    let alice_id = submit(&mut cluster.client_as("alice"), "alice's, beside it");
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    eventually("both to be in flight", BOUND, || {
        match (
            state_and_attempts(&mut admin, held).0.as_str(),
            state_and_attempts(&mut admin, alice_id).0.as_str(),
        ) {
            ("submitted", "submitted") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let mut locker = cluster.client_as("mallory");
    let mut lock = locker.transaction().unwrap();
    lock.execute(
        "SELECT id FROM llmbatching.requests WHERE id = $1 FOR UPDATE",
        &[&held],
    )
    .unwrap();
    // The expired batch ends all the same: alice's request is sent again and answered, and
    // mallory's keeps the batch's outcome aside until she lets go.
    wait_completed(&mut admin, &format!("id = {alice_id}"), 1, BOUND);
    let (state, kept): (String, i64) = {
        let row = admin
            .query_one(
                "SELECT b.state, (SELECT count(*) FROM llmbatching.held_answers h WHERE h.batch_id = b.id)
                   FROM llmbatching.batches b JOIN llmbatching.requests r ON r.batch_id = b.id
                  WHERE r.id = $1",
                &[&held],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((state.as_str(), kept), ("done", 1));
    assert_eq!(state_and_attempts(&mut admin, held).0, "submitted");
    lock.commit().unwrap();
    // Released, it goes back to the queue (it never ran) and is answered.
    wait_completed(&mut admin, &format!("id = {held}"), 1, BOUND);
    assert_eq!(state_and_attempts(&mut admin, held).1, 2);
    assert_eq!(state_and_attempts(&mut admin, alice_id).1, 2);
    let twice = cluster.emulator.stats().ran_more_than_once();
    assert!(
        twice.is_empty(),
        "the provider ran these more than once: {twice:?}"
    );
    assert_eq!(
        one::<i64>(&mut admin, "SELECT count(*) FROM llmbatching.held_answers"),
        0
    );
}

#[test]
fn housekeeping_waits_for_no_row_a_role_keeps_locked() {
    // Finished rows are purged a second after they finish.
    let cluster = shared_database(quick(), &[("llmbatching.retention", "1s")]);
    let mut admin = cluster.client();
    let mut mallory = cluster.client_as("mallory");
    // A write-back of mallory's, written, and so due to be purged.
    make_table(&mut mallory, "mallory.kept", 1);
    assert_eq!(classify(&mut mallory, "mallory.kept", "body"), 1);
    wait_written(&mut admin, &into("mallory.kept"), 1, BOUND);
    // Two identical requests of hers, the second waiting on the first, which she cancels.
    admin
        .batch_execute(
            "INSERT INTO llmbatching.model_pauses VALUES ('paused', now() + interval '1 hour', 'test')",
        )
        .unwrap();
    let row = mallory
        .query_one(
            "SELECT llmbatching.llm_submit('paused', 'twice'), llmbatching.llm_submit('paused', 'twice')",
            &[],
        )
        .unwrap();
    let (first, second): (i64, i64) = (row.get(0), row.get(1));
    // She keeps the written write-back and the waiting request locked, in a transaction left
    // open, and then cancels the request the other waits on.
    let mut locker = cluster.client_as("mallory");
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute(&format!(
        "SELECT FROM llmbatching.writebacks WHERE target = 'mallory.kept'::regclass FOR KEY SHARE;
         SELECT FROM llmbatching.requests WHERE id = {second} FOR UPDATE;"
    ))
    .unwrap();
    mallory
        .execute("SELECT llmbatching.llm_cancel($1)", &[&first])
        .unwrap();

    // The worker's rounds go on: alice's answers are written meanwhile.
    let mut alice = cluster.client_as("alice");
    make_table(&mut alice, "alice.notes", 3);
    assert_eq!(
        classify(&mut alice, "alice.notes", "'Classify: ' || body"),
        3
    );
    eventually("alice's answers", Duration::from_secs(40), || {
        let written: i64 = one(
            &mut admin,
            "SELECT count(*) FROM alice.notes WHERE answer IS NOT NULL",
        );
        if written == 3 {
            Ok(())
        } else {
            Err(format!("{written} written"))
        }
    });
    assert_answers(&mut admin, "alice.notes", 3);
    // And alice's finished rows are purged, while mallory's held one is left for later.
    let write_backs = |c: &mut Client, table: &str| -> i64 {
        one(
            c,
            &format!(
                "SELECT count(*) FROM llmbatching.writebacks WHERE target = '{table}'::regclass"
            ),
        )
    };
    eventually(
        "alice's finished rows to be purged",
        BOUND,
        || match write_backs(&mut admin, "alice.notes") {
            0 => Ok(()),
            left => Err(format!("{left} left")),
        },
    );
    assert_eq!(write_backs(&mut admin, "mallory.kept"), 1);
    lock.commit().unwrap();
    // Released, the waiting request takes the cancelled one's place, and the written rows go.
    eventually("the waiting request to be promoted", BOUND, || {
        let waits_on: Option<i64> = admin
            .query_one(
                "SELECT reused_from FROM llmbatching.requests WHERE id = $1",
                &[&second],
            )
            .unwrap()
            .get(0);
        match waits_on {
            None => Ok(()),
            Some(id) => Err(format!("waits on {id}")),
        }
    });
    eventually("mallory's written write-back to be purged", BOUND, || {
        let left: i64 = one(
            &mut admin,
            "SELECT count(*) FROM llmbatching.writebacks WHERE target = 'mallory.kept'::regclass",
        );
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} left"))
        }
    });

    // An answer that waits to be written (its table locked by its owner) is not purged, however
    // long it waits: once the table is free, it is written.
    make_table(&mut mallory, "mallory.later", 1);
    let mut owner = cluster.client_as("mallory");
    let mut table_lock = owner.transaction().unwrap();
    table_lock
        .batch_execute("LOCK TABLE mallory.later IN EXCLUSIVE MODE")
        .unwrap();
    assert_eq!(
        classify(&mut mallory, "mallory.later", "'Classify: ' || body"),
        1
    );
    eventually("the answer to wait for its row", BOUND, || {
        match one::<i64>(
            &mut admin,
            "SELECT count(*) FROM llmbatching.writebacks w JOIN llmbatching.requests r ON r.id = w.request_id
              WHERE w.target = 'mallory.later'::regclass AND r.state = 'completed'
                AND r.finished_at < now() - interval '3 seconds'",
        ) {
            1 => Ok(()),
            n => Err(format!("{n} completed more than 3 s ago")),
        }
    });
    table_lock.commit().unwrap();
    // (Written, its rows are then purged at once: the answer is looked for in the table.)
    eventually("the answer to be written", BOUND, || {
        match one::<i64>(
            &mut admin,
            "SELECT count(*) FROM mallory.later WHERE answer IS NOT NULL",
        ) {
            1 => Ok(()),
            n => Err(format!("{n} written")),
        }
    });
    assert_answers(&mut admin, "mallory.later", 1);
}

#[test]
fn code_that_ends_its_process_never_runs_in_the_worker() {
    // No background worker slot is free for a writer (a role could fill them with parallel
    // queries): the worker itself must not run a role's code, which the watchdog may end.
    let cluster = shared_database(
        quick(),
        &[
            ("max_worker_processes", "2"),
            ("max_logical_replication_workers", "0"),
            ("max_parallel_workers", "0"),
            ("llmbatching.write_back_timeout", "1s"),
        ],
    );
    let mut admin = cluster.client();
    let worker = cluster.worker_pid();
    let mut mallory = cluster.client_as("mallory");
    make_table(&mut mallory, "mallory.tarpit", 1);
    add_tarpit(&mut mallory, "mallory");
    assert_eq!(classify(&mut mallory, "mallory.tarpit", "body"), 1);
    wait_completed(&mut admin, "submitted_by = 'mallory'", 1, BOUND);
    // Longer than the watchdog would give the tarpit (its time limit and 5 s more), while bob's
    // requests come and go.
    let mut bob = cluster.client_as("bob");
    for round in 0..8 {
        let id: i64 = bob
            .query_one(
                "SELECT llmbatching.llm_submit('m', $1)",
                &[&format!("bob's request {round}")],
            )
            .unwrap()
            .get(0);
        wait_completed(&mut admin, &format!("id = {id}"), 1, BOUND);
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(cluster.worker_pid(), worker, "the worker was ended");
    assert!(
        !cluster.log().contains("terminating background worker"),
        "the watchdog had to end a process"
    );
    let written: i64 = one(
        &mut admin,
        "SELECT count(*) FROM mallory.tarpit WHERE answer IS NOT NULL",
    );
    assert_eq!(written, 0);
}
