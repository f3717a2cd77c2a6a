//! The example dbt project in examples/dbt, run with dbt-core and dbt-postgres against a test
//! cluster: one run submits the seed rows, a later run materializes the answers.
//!
//! dbt is found through `DBT` or at target/dbt-venv/bin/dbt, where scripts/test installs it.

mod common;

use common::{Cluster, EmulatorConfig};
use std::path::{Path, PathBuf};
use std::process::Command;

fn dbt_binary() -> PathBuf {
    let path = std::env::var("DBT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/dbt-venv/bin/dbt"));
    assert!(
        path.exists(),
        "dbt not found at {}; scripts/test installs it (or set DBT)",
        path.display()
    );
    path
}

struct Project {
    dir: PathBuf,
    port: u16,
}

impl Project {
    /// A copy of the example project, so dbt's own output stays out of the repository.
    fn copy(port: u16) -> Project {
        let dir =
            std::env::temp_dir().join(format!("llmbatching-dbt-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/dbt");
        let status = Command::new("cp")
            .arg("-r")
            .arg(&source)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        Project { dir, port }
    }

    fn dbt(&self, args: &[&str]) -> String {
        let out = Command::new(dbt_binary())
            .args(args)
            .args(["--profiles-dir", ".", "--no-use-colors"])
            .current_dir(&self.dir)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "dbt {args:?} failed:\n{text}");
        text
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_example_dbt_project_submits_on_one_run_and_materializes_answers_on_a_later_one() {
    let cluster = Cluster::start(
        EmulatorConfig {
            in_progress_ms: 1500,
            ..EmulatorConfig::default()
        },
        &[],
    );
    cluster
        .client()
        .batch_execute("CREATE EXTENSION llmbatching")
        .unwrap();
    let project = Project::copy(cluster.port);

    project.dbt(&["seed"]);
    project.dbt(&["run"]);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE job = 'dbt_reviews'"),
        6
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM analytics.review_sentiment WHERE status = 'completed'"),
        0
    );

    let waited = project.dbt(&[
        "run-operation",
        "llm_wait_for_job",
        "--args",
        "{job: dbt_reviews, timeout: 2 minutes}",
    ]);
    assert!(
        waited.contains("llmbatching job dbt_reviews finished"),
        "{waited}"
    );
    project.dbt(&["run"]);
    let mut c = cluster.client();
    let rows = c
        .query(
            "SELECT id, body, status, sentiment FROM analytics.review_sentiment ORDER BY id",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 6);
    for row in &rows {
        let (body, status, sentiment): (String, String, Option<String>) =
            (row.get(1), row.get(2), row.get(3));
        assert_eq!(status, "completed", "{body}");
        let sentiment = sentiment.unwrap();
        assert!(
            body.to_lowercase().contains(&sentiment),
            "{body} -> {sentiment}"
        );
    }

    // A new seed row: the next run submits just that one.
    let seed = project.dir.join("seeds/reviews.csv");
    let mut csv = std::fs::read_to_string(&seed).unwrap();
    csv.push_str("7,\"Negative: arrived broken.\"\n");
    std::fs::write(&seed, csv).unwrap();
    project.dbt(&["seed"]);
    project.dbt(&["run"]);
    assert_eq!(
        cluster.count("SELECT count(*) FROM llmbatching.requests WHERE job = 'dbt_reviews'"),
        7
    );
    project.dbt(&[
        "run-operation",
        "llm_wait_for_job",
        "--args",
        "{job: dbt_reviews}",
    ]);
    project.dbt(&["run"]);
    let seventh: String = c
        .query_one(
            "SELECT sentiment FROM analytics.review_sentiment WHERE id = 7",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(seventh, "negative");
}
