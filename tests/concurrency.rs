//! Many sessions submitting, reading and cancelling at once while the worker runs.

mod common;

use common::{Cluster, EmulatorConfig};
use llmbatching_emulator::answers::echo_answer;
use std::time::Duration;

const SESSIONS: usize = 8;
const TRANSACTIONS: usize = 10;
const PER_TRANSACTION: usize = 30;

#[test]
fn eight_sessions_submitting_at_once_lose_nothing_and_never_deadlock() {
    let cluster = Cluster::start(
        EmulatorConfig {
            validating_ms: 20,
            in_progress_ms: 100,
            finalizing_ms: 20,
            ..EmulatorConfig::default()
        },
        &[
            ("llmbatching.batch_wait", "50ms"),
            ("llmbatching.batch_max_requests", "100"),
        ],
    );
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();

    let submitted: Vec<Vec<(i64, String, String, bool)>> = std::thread::scope(|scope| {
        let sessions: Vec<_> = (0..SESSIONS)
            .map(|session| {
                let cluster = &cluster;
                scope.spawn(move || {
                    let mut c = cluster.client();
                    let mut mine = Vec::new();
                    for t in 0..TRANSACTIONS {
                        let mut tx = c.transaction().unwrap();
                        for n in 0..PER_TRANSACTION {
                            let model = format!("model-{}", (session + n) % 3);
                            let prompt = format!("session {session} transaction {t} request {n}");
                            let id: i64 = tx
                                .query_one("SELECT llm_submit($1, $2)", &[&model, &prompt])
                                .unwrap()
                                .get(0);
                            mine.push((id, model, prompt, false));
                        }
                        tx.commit().unwrap();
                        // Read back and cancel while the worker claims around us.
                        let (id, ..) = mine[mine.len() - 1];
                        let _: Option<String> =
                            c.query_one("SELECT llm_status($1)", &[&id]).unwrap().get(0);
                        if t % 3 == 0 {
                            let last = mine.len() - 1;
                            mine[last].3 =
                                c.query_one("SELECT llm_cancel($1)", &[&id]).unwrap().get(0);
                        }
                    }
                    mine
                })
            })
            .collect();
        sessions
            .into_iter()
            .map(|s| s.join().expect("a session failed"))
            .collect()
    });
    cluster.wait_until_settled(Duration::from_secs(300));

    let mut c = cluster.client();
    let total: usize = submitted.iter().map(Vec::len).sum();
    assert_eq!(total, SESSIONS * TRANSACTIONS * PER_TRANSACTION);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests") as usize,
        total
    );
    for (id, model, prompt, cancelled) in submitted.into_iter().flatten() {
        let row = c
            .query_one("SELECT llm_status($1), llm_result($1)", &[&id])
            .unwrap();
        let status: String = row.get(0);
        if cancelled {
            assert_eq!(status, "cancelled", "{prompt}");
        } else {
            assert_eq!(status, "completed", "{prompt}");
            assert_eq!(
                row.get::<_, Option<String>>(1),
                Some(echo_answer(&model, &prompt))
            );
        }
    }
    assert!(!cluster.log().contains("deadlock detected"));
    assert!(cluster.emulator.stats().ran_more_than_once().is_empty());
}
