//! Chaos: thousands of requests while the worker is killed and the server crashes at random
//! moments, with the provider failing, dropping and truncating calls. Every request must end
//! answered exactly once (or failed where the fault was permanent), and no batch may be
//! created twice. Run for each kind of provider: OpenAI (the server openai), Anthropic and
//! Azure OpenAI (servers on the emulator's other protocols).

mod common;

use common::{Cluster, EmulatorConfig};
use llmbatching_emulator::answers::{echo_answer, failure_message, FAIL_MARKER};
use llmbatching_emulator::Fault;
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A kind of provider under chaos: how its server is set up, what it is sent, and how much.
struct Scenario {
    name: &'static str,
    /// SQL run after CREATE EXTENSION (`{anthropic}` and `{azure}` stand for the emulator's
    /// addresses), and the provider requests go through.
    setup: &'static str,
    provider: &'static str,
    endpoints: [&'static str; 2],
    requests: i32,
    kills: usize,
    restarts: usize,
}

const OPENAI: Scenario = Scenario {
    name: "openai",
    setup: "",
    provider: "openai",
    endpoints: ["/v1/responses", "/v1/chat/completions"],
    requests: 5000,
    kills: 10,
    restarts: 10,
};

const ANTHROPIC: Scenario = Scenario {
    name: "anthropic",
    setup: "CREATE SERVER claude FOREIGN DATA WRAPPER llmbatching OPTIONS (kind 'anthropic', api_base '{anthropic}');
            CREATE USER MAPPING FOR PUBLIC SERVER claude OPTIONS (api_key 'sk-ant-chaos');",
    provider: "claude",
    endpoints: ["/v1/messages", "/v1/messages"],
    requests: 2000,
    kills: 5,
    restarts: 5,
};

const AZURE: Scenario = Scenario {
    name: "azure",
    setup: "CREATE SERVER azure FOREIGN DATA WRAPPER llmbatching OPTIONS (kind 'azure', api_base '{azure}');
            CREATE USER MAPPING FOR PUBLIC SERVER azure OPTIONS (api_key 'azure-chaos');",
    provider: "azure",
    endpoints: ["/v1/chat/completions", "/v1/responses"],
    requests: 2000,
    kills: 5,
    restarts: 5,
};

/// A small deterministic generator, seeded and printed so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }
}

fn faulty_provider() -> EmulatorConfig {
    let mut faults = BTreeMap::new();
    for op in [
        "upload", "create", "get", "list", "content", "delete", "cancel",
    ] {
        let fault = Fault {
            error_rate: 0.15,
            statuses: vec![429, 500, 502, 503],
            retry_after: None,
            drop_rate: 0.05,
            truncate_rate: 0.05,
            delay_ms: 10,
            ..Fault::default()
        };
        faults.insert(op.to_string(), fault);
    }
    EmulatorConfig {
        validating_ms: 100,
        in_progress_ms: 1500,
        finalizing_ms: 100,
        expire_next: 2,
        expire_fraction: 0.5,
        line_failure_rate: 0.01,
        line_failure_status: 500,
        faults,
        ..EmulatorConfig::default()
    }
}

#[test]
fn crashes_and_provider_faults_lose_no_request_and_pay_for_none_twice() {
    chaos(&OPENAI);
}

#[test]
fn anthropic_under_chaos_loses_no_request_and_pays_for_none_twice() {
    chaos(&ANTHROPIC);
}

#[test]
fn azure_under_chaos_loses_no_request_and_pays_for_none_twice() {
    chaos(&AZURE);
}

fn chaos(scenario: &Scenario) {
    let Scenario {
        name,
        provider,
        requests,
        kills,
        restarts,
        ..
    } = *scenario;
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("chaos ({name}): seed {seed} (set CHAOS_SEED to replay the same schedule)");
    let mut rng = Rng(seed);
    let cluster = Cluster::start(
        faulty_provider(),
        &[
            ("llmbatching.batch_max_requests", "400"),
            ("llmbatching.max_attempts", "20"),
            ("llmbatching.batch_wait", "300ms"),
        ],
    );
    let mut c = cluster.client();
    let setup = scenario
        .setup
        .replace("{anthropic}", &cluster.emulator.anthropic_base_url)
        .replace("{azure}", &cluster.emulator.azure_base_url);
    let [even, odd] = scenario.endpoints;
    c.batch_execute(&format!(
        "CREATE EXTENSION llmbatching;
         {setup}
         CREATE TABLE jobs (id int PRIMARY KEY, model text, endpoint text, prompt text, request_id bigint);
         INSERT INTO jobs
         SELECT g, 'model-' || (g % 3),
                CASE WHEN g % 2 = 0 THEN '{even}' ELSE '{odd}' END,
                'prompt ' || g || CASE WHEN g % 97 = 0 THEN ' {FAIL_MARKER}' ELSE '' END
           FROM generate_series(1, {requests}) g;
         UPDATE jobs SET request_id = llm_submit(model, prompt, endpoint => endpoint, provider => '{provider}');"
    ))
    .unwrap();

    let started = Instant::now();
    let mut events: Vec<&str> = [vec!["kill"; kills], vec!["restart"; restarts]].concat();
    for i in (1..events.len()).rev() {
        events.swap(i, rng.between(0, i as u64 + 1) as usize);
    }
    for event in &events {
        std::thread::sleep(Duration::from_millis(rng.between(200, 1500)));
        match *event {
            "kill" => {
                let pid = cluster.worker_pid();
                std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status()
                    .unwrap();
            }
            _ => cluster.restart("immediate"),
        }
    }
    cluster.wait_until_settled(Duration::from_secs(600));

    let mut c = cluster.client();
    let rows = c
        .query(
            "SELECT j.model, j.prompt, llm_status(j.request_id), llm_result(j.request_id), llm_error(j.request_id),
                    j.request_id
               FROM jobs j",
            &[],
        )
        .unwrap();
    let (mut completed, mut failed) = (0, 0);
    for row in &rows {
        let (model, prompt, status): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let request_id: i64 = row.get(5);
        if prompt.contains(FAIL_MARKER) {
            assert_eq!(status, "failed", "{prompt}");
            let error = row.get::<_, Option<String>>(4).unwrap_or_default();
            assert!(
                error.contains(&failure_message(&request_id.to_string())),
                "{prompt}: {error}"
            );
            failed += 1;
        } else {
            assert_eq!(
                status,
                "completed",
                "{prompt}: {:?}",
                row.get::<_, Option<String>>(4)
            );
            assert_eq!(
                row.get::<_, Option<String>>(3),
                Some(echo_answer(&model, &prompt)),
                "{prompt}"
            );
            completed += 1;
        }
    }
    let stats = cluster.emulator.stats();
    let batches = cluster
        .count("SELECT count(*) FROM llmbatching.batches WHERE provider_batch_id IS NOT NULL");
    let twice = stats.ran_more_than_once();
    let summary = format!(
        "chaos ({name}): {} requests: {completed} completed, {failed} failed as injected; {} batches created at the provider, \
         {batches} recorded; {} custom_ids answered more than once; {} faults injected; {kills} kills and {restarts} \
         immediate restarts; settled in {:.0?} (seed {seed})",
        rows.len(),
        stats.batches_created,
        twice.len(),
        stats.faults_injected,
        started.elapsed()
    );
    println!("{summary}");
    // The test runner hides a passing test's output; scripts/test prints this file instead.
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-summary-{name}.txt")),
        &summary,
    );
    assert_eq!(rows.len(), requests as usize);
    assert!(twice.is_empty(), "answered more than once: {twice:?}");
    assert_eq!(
        stats.batches_created, batches as u64,
        "a batch was created twice"
    );
}
