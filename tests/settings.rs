//! Settings as users meet them: the key is no setting, and the documented defaults and units
//! hold.

mod common;

use common::{Cluster, EmulatorConfig, API_KEY};

#[test]
fn the_key_is_no_setting_and_comes_from_a_file_only_the_server_reads() {
    let cluster = Cluster::start(
        EmulatorConfig {
            api_key: Some(API_KEY.into()),
            ..EmulatorConfig::default()
        },
        &[],
    );
    let mut admin = cluster.client();
    admin.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    let err = admin
        .batch_execute("SHOW llmbatching.api_key")
        .expect_err("the key is a setting");
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("llmbatching.api_key"), "{message}");
    // The file's name is a setting; the key in it is read by the worker alone.
    let file: String = admin
        .query_one("SHOW llmbatching.api_key_file", &[])
        .unwrap()
        .get(0);
    assert_eq!(file, "llmbatching.key");
    let show_all = admin.query("SHOW ALL", &[]).unwrap();
    assert!(show_all
        .iter()
        .all(|r| !r.get::<_, String>(1).contains(API_KEY)));
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
    assert_eq!(values, ["5min", "100ms", "100000", "256MB", ""]);
    let err = c
        .batch_execute("ALTER SYSTEM SET llmbatching.batch_max_requests = 100001")
        .unwrap_err();
    assert!(
        err.to_string().contains("outside the valid range")
            || format!("{err:?}").contains("outside the valid range")
    );
}
