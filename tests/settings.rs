//! Settings as users meet them: the key stays hidden from ordinary roles, and the documented
//! defaults and units hold.

mod common;

use common::{Cluster, EmulatorConfig, API_KEY};

#[test]
fn the_api_key_is_hidden_from_ordinary_roles() {
    let cluster = Cluster::start(EmulatorConfig::default(), &[]);
    let mut admin = cluster.client();
    admin
        .batch_execute("CREATE EXTENSION llmbatching; CREATE ROLE analyst LOGIN")
        .unwrap();
    let shown: String = admin
        .query_one("SHOW llmbatching.api_key", &[])
        .unwrap()
        .get(0);
    assert_eq!(shown, API_KEY, "a superuser can read it");

    let mut analyst = cluster.client_as("analyst");
    for sql in [
        "SHOW llmbatching.api_key",
        "SELECT current_setting('llmbatching.api_key')",
    ] {
        let err = analyst.batch_execute(sql).expect_err(sql);
        let message = err
            .as_db_error()
            .map(|e| e.message().to_owned())
            .unwrap_or_default();
        assert!(message.contains("must be superuser"), "{sql}: {message}");
        assert!(!message.contains(API_KEY));
    }
    let visible: i64 = analyst
        .query_one(
            "SELECT count(*) FROM pg_settings WHERE name = 'llmbatching.api_key'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(visible, 0);
    let show_all = analyst.query("SHOW ALL", &[]).unwrap();
    assert!(show_all
        .iter()
        .all(|r| r.get::<_, String>(0) != "llmbatching.api_key"));
}

#[test]
fn time_settings_take_units_and_limits_are_capped() {
    let cluster = Cluster::start(
        EmulatorConfig::default(),
        &[("llmbatching.batch_wait", "5min")],
    );
    let mut c = cluster.client();
    let row = c
        .query_one(
            "SELECT current_setting('llmbatching.batch_wait'), current_setting('llmbatching.poll_interval'),
                    current_setting('llmbatching.batch_max_requests'), current_setting('llmbatching.batch_max_bytes'),
                    current_setting('llmbatching.database')",
            &[],
        )
        .unwrap();
    let values: Vec<String> = (0..5).map(|i| row.get(i)).collect();
    assert_eq!(values, ["5min", "100ms", "50000", "200MB", "postgres"]);
    let err = c
        .batch_execute("ALTER SYSTEM SET llmbatching.batch_max_requests = 50001")
        .unwrap_err();
    assert!(
        err.to_string().contains("outside the valid range")
            || format!("{err:?}").contains("outside the valid range")
    );
}
