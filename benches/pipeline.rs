//! The benchmark suite: each figure next to a baseline measured in the same run, as a ratio.
//! Run it with `scripts/bench` (which installs the release build first); `--quick` uses smaller
//! sizes. It starts its own clusters and emulators, like the tests.
//!
//! - B1 submit: `llm_submit` over generate_series against a plain INSERT of the same bodies.
//! - B2 claim, build and upload: the worker turning queued requests into an uploaded input
//!   file, against the cheapest claim of the same rows, reading their bodies, and uploading the
//!   same bytes with curl.
//! - B3 ingest: an output file to every request completed, against COPY of the same lines.
//! - B4 memory: the peak private memory of the worker (above idle) and of its reader while they
//!   carry a ~200 MB batch.
//! - B5 end to end: many requests over 20 batches, against doing the same job by hand with the
//!   official `openai` SDK and psycopg (benches/baseline_sdk.py) on the same emulator and database,
//!   with the CPU seconds each side used (the server's processes, the emulator, the script).
//! - B6 WAL: bytes of WAL per request over its whole life, against inserting it once and
//!   updating it once.
//! - B7 concurrency: 16 sessions submitting at once (pgbench), against the same sessions doing
//!   plain INSERTs of the same rows.
//! - B8 scaling: B5 at a tenth of its size and at its size; the time per request must not grow.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Cluster, EmulatorConfig};
use postgres::Client;
use std::process::Command;
use std::time::{Duration, Instant};

struct Sizes {
    submit: i64,
    batch: i64,
    memory_requests: i64,
    memory_prompt_bytes: usize,
    end_to_end: i64,
}

fn instant_provider() -> EmulatorConfig {
    EmulatorConfig {
        validating_ms: 0,
        in_progress_ms: 0,
        finalizing_ms: 0,
        ..EmulatorConfig::default()
    }
}

/// One figure beside its baseline; `goal` is the ratio to reach (infinite: no goal, a figure to
/// watch).
fn report(name: &str, ours: f64, baseline: f64, unit: &str, goal: f64) {
    let ratio = ours / baseline;
    let verdict = if goal.is_infinite() {
        "no goal".to_string()
    } else if ratio <= goal {
        format!("goal <= {goal}: meets")
    } else {
        format!("goal <= {goal}: misses")
    };
    println!("{name:<22} {ours:>10.3} {unit}  baseline {baseline:>10.3} {unit}  ratio {ratio:>6.2}  ({verdict})");
}

fn seconds(c: &mut Client, sql: &str) -> f64 {
    let started = Instant::now();
    c.batch_execute(sql).unwrap();
    started.elapsed().as_secs_f64()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// The median of three runs of `run`, each returning the seconds it measured.
fn median_of_three(mut run: impl FnMut() -> f64) -> f64 {
    median((0..3).map(|_| run()).collect())
}

/// B1: three alternating runs of each, median.
fn b1_submit(n: i64) {
    let cluster = Cluster::start(instant_provider(), &[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching; CREATE TABLE plain (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body jsonb)")
        .unwrap();
    let (mut ours, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        plain.push(seconds(
            &mut c,
            &format!("INSERT INTO plain (body) SELECT jsonb_build_object('model', 'gpt-4o-mini', 'input', 'Classify: review ' || g) FROM generate_series(1, {n}) g"),
        ));
        ours.push(seconds(&mut c, &format!("SELECT count(llm_submit('gpt-4o-mini', 'Classify: review ' || g)) FROM generate_series(1, {n}) g")));
        c.batch_execute("TRUNCATE plain; TRUNCATE llmbatching.requests CASCADE")
            .unwrap();
    }
    let (plain, ours) = (median(plain), median(ours));
    let stored = store_rows_seconds(&mut c, n);
    report(&format!("B1 submit ({n})"), ours, stored, "s", 1.1);
    println!(
        "   baseline (the floor): a plain INSERT of the rows llm_submit stores, into a copy of llmbatching.requests with its indexes (no triggers); {:.1} times a plain insert of bare bodies ({plain:.3} s), llm_submit {:.1} times",
        stored / plain,
        ours / plain
    );
}

/// What storing `n` requests costs at least: a plain INSERT of the rows `llm_submit` writes
/// (the same columns, a SHA-256 per row) into a copy of the requests table with its indexes,
/// but without its triggers. The median of three.
fn store_rows_seconds(c: &mut Client, n: i64) -> f64 {
    c.batch_execute("CREATE TABLE stored (LIKE llmbatching.requests INCLUDING ALL)")
        .unwrap();
    median_of_three(|| {
        let took = seconds(
            c,
            &format!(
                "INSERT INTO stored (endpoint, model, body, request_hash)
                 SELECT '/v1/responses', 'gpt-4o-mini', jsonb_build_object('model', 'gpt-4o-mini', 'input', 'Classify: review ' || g),
                        sha256(int8send(g))
                   FROM generate_series(1, {n}) g"
            ),
        );
        c.batch_execute("TRUNCATE stored").unwrap();
        took
    })
}

fn curl(args: &[&str]) -> f64 {
    let started = Instant::now();
    let out = Command::new("curl")
        .args(["-s", "-S", "-f"])
        .args(args)
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed().as_secs_f64()
}

/// What building any input file costs at least: the server reading every request's body as
/// text, nothing written and nothing sent (after a VACUUM, the median of three).
fn read_bodies_seconds(c: &mut Client) -> f64 {
    c.batch_execute("VACUUM llmbatching.requests").unwrap();
    median_of_three(|| {
        seconds(
            c,
            "SELECT sum(octet_length(body::text)) FROM llmbatching.requests",
        )
    })
}

/// What any claim that writes a row per request costs at least: one statement marking `n` rows
/// of a narrow, freshly vacuumed table (primary key only) as taken by a batch.
fn mark_rows_seconds(c: &mut Client, n: i64) -> f64 {
    c.batch_execute(&format!(
        "CREATE TABLE marked (id bigint PRIMARY KEY, state text NOT NULL, batch_id bigint);
         INSERT INTO marked SELECT g, 'queued', NULL FROM generate_series(1, {n}) g"
    ))
    .unwrap();
    c.batch_execute("VACUUM ANALYZE marked").unwrap();
    let ids: Vec<i64> = (1..=n).collect();
    let started = Instant::now();
    c.execute(
        "UPDATE marked SET state = 'submitted', batch_id = 1 WHERE id = ANY($1)",
        &[&ids],
    )
    .unwrap();
    started.elapsed().as_secs_f64()
}

/// What claiming `n` requests costs at least: one statement marking them as taken by a batch in
/// a freshly vacuumed copy of the requests table with its indexes and without its triggers (the
/// same rows and indexes, as B1's floor is). The rows are the batch's own, queued again.
fn claim_rows_seconds(c: &mut Client, n: i64) -> f64 {
    c.batch_execute(
        "CREATE TABLE claimed_copy (LIKE llmbatching.requests INCLUDING ALL);
         INSERT INTO claimed_copy (id, endpoint, model, body, request_hash, submitted_by) OVERRIDING SYSTEM VALUE
         SELECT id, endpoint, model, body, request_hash, submitted_by FROM llmbatching.requests",
    )
    .unwrap();
    c.batch_execute("VACUUM ANALYZE claimed_copy").unwrap();
    let ids: Vec<i64> = c
        .query("SELECT id FROM claimed_copy ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len() as i64, n);
    let started = Instant::now();
    c.execute(
        "UPDATE claimed_copy SET state = 'submitted', batch_id = 1, attempts = attempts + 1,
                submitted_at = now()
          WHERE id = ANY($1)",
        &[&ids],
    )
    .unwrap();
    started.elapsed().as_secs_f64()
}

/// B2 and B3 on one batch of `n` requests.
fn b2_b3_build_upload_ingest(n: i64) {
    let cluster = Cluster::start(
        instant_provider(),
        &[
            ("llmbatching.batch_wait", "1h"),
            ("llmbatching.delete_provider_files", "off"),
            ("llmbatching.poll_interval", "50ms"),
        ],
    );
    let mut c = cluster.client();
    c.batch_execute(&format!(
        "CREATE EXTENSION llmbatching; SELECT count(llm_submit('gpt-4o-mini', 'Classify: review ' || g)) FROM generate_series(1, {n}) g"
    ))
    .unwrap();
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    cluster.wait_until_settled(Duration::from_secs(1200));
    // (The batch is marked finished in the transaction after its last answers.)
    cluster.wait_for("the batch to be finished", Duration::from_secs(60), || {
        cluster.count("SELECT count(*) FROM llmbatching.batches WHERE finished_at IS NULL") == 0
    });
    let row = c
        .query_one(
            "SELECT extract(epoch FROM create_attempted_at - created_at)::float8,
                    extract(epoch FROM finished_at - ended_at)::float8, input_file_id, output_file_id
               FROM llmbatching.batches",
            &[],
        )
        .unwrap();
    let (build_upload, ingest): (f64, f64) = (row.get(0), row.get(1));
    let (input_id, output_id): (String, String) = (row.get(2), row.get(3));

    let dir = std::env::temp_dir().join(format!("llmbatching-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("input.jsonl");
    let output = dir.join("output.jsonl");
    let base = &cluster.emulator.base_url;
    let auth = "Authorization: Bearer sk-bench";
    curl(&[
        "-H",
        auth,
        "-o",
        input.to_str().unwrap(),
        &format!("{base}/files/{input_id}/content"),
    ]);
    curl(&[
        "-H",
        auth,
        "-o",
        output.to_str().unwrap(),
        &format!("{base}/files/{output_id}/content"),
    ]);
    let upload = curl(&[
        "-o",
        "/dev/null",
        "-H",
        auth,
        "-F",
        "purpose=batch",
        "-F",
        &format!("file=@{};filename=input.jsonl", input.display()),
        &format!("{base}/files"),
    ]);

    // COPY the same lines, as (id, line) rows, into a fresh table: the median of three.
    let text = std::fs::read_to_string(&output).unwrap();
    let mut rows = String::with_capacity(text.len() + text.len() / 8);
    for (i, line) in text.lines().enumerate() {
        let escaped = line.replace('\\', "\\\\").replace('\t', "\\t");
        rows.push_str(&format!("{i}\t{escaped}\n"));
    }
    let mut round = 0;
    let copy = median_of_three(|| {
        round += 1;
        c.batch_execute(&format!(
            "CREATE TABLE copied{round} (id bigint, line jsonb)"
        ))
        .unwrap();
        let started = Instant::now();
        let mut writer = c
            .copy_in(&format!("COPY copied{round} FROM STDIN"))
            .unwrap();
        std::io::Write::write_all(&mut writer, rows.as_bytes()).unwrap();
        writer.finish().unwrap();
        started.elapsed().as_secs_f64()
    });
    report(&format!("B3 ingest ({n})"), ingest, copy, "s", 2.0);
    // B2's floor: the cheapest claim of these rows, reading the bodies, and the upload.
    let claim = claim_rows_seconds(&mut c, n);
    let mark = mark_rows_seconds(&mut c, n);
    let read = read_bodies_seconds(&mut c);
    report(
        &format!("B2 claim+build+upload ({n})"),
        build_upload,
        claim + read + upload,
        "s",
        1.5,
    );
    println!(
        "   baseline (the floor): one UPDATE marking the {n} rows taken in a copy of the requests table {claim:.3} s, reading the bodies as text {read:.3} s, the curl upload {upload:.3} s"
    );
    println!(
        "   against a claim of a three-column table instead ({mark:.3} s): {:.2}",
        build_upload / (mark + read + upload)
    );
    for line in cluster.log().lines().filter(|l| l.contains("read back")) {
        println!(
            "   worker: {}",
            line.split("llmbatching: ").nth(1).unwrap_or(line)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Private (anonymous) resident memory of a process, in kB: shared buffers are not counted.
fn rss_anon_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// B4: sample the worker's private memory while it builds, uploads and ingests one big batch.
fn b4_memory(requests: i64, prompt_bytes: usize) {
    let cluster = Cluster::start(instant_provider(), &[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching").unwrap();
    let worker = cluster.worker_pid();
    c.execute(
        "SELECT count(llm_submit('gpt-4o-mini', g || repeat('x', $1))) FROM generate_series(1, $2::bigint) g",
        &[&(prompt_bytes as i32), &requests],
    )
    .unwrap();
    let mb: f64 = cluster
        .count("SELECT sum(body_bytes)::bigint / (1024 * 1024) FROM llmbatching.requests")
        as f64;
    std::thread::sleep(Duration::from_millis(500));
    let idle = rss_anon_kb(worker);
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    let (mut peak, mut reader_peak) = (idle, 0);
    let deadline = Instant::now() + Duration::from_secs(1200);
    while cluster
        .count("SELECT count(*) FROM llmbatching.requests WHERE state IN ('queued', 'submitted')")
        > 0
    {
        assert!(Instant::now() < deadline, "B4 did not finish");
        // The batch is read back by a reader process when one can start: its memory counts
        // too, all of it (it starts for the batch).
        let readers: Vec<i32> = c
            .query(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'llmbatching reader'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for _ in 0..10 {
            peak = peak.max(rss_anon_kb(worker));
            for &reader in &readers {
                reader_peak = reader_peak.max(rss_anon_kb(reader));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let worker_above = (peak.saturating_sub(idle)) as f64 / 1024.0;
    let reader = reader_peak as f64 / 1024.0;
    let above = worker_above + reader;
    let verdict = if above < 100.0 { "meets" } else { "misses" };
    println!(
        "B4 memory ({mb:.0} MB batch)  peak {above:.1} MB: the worker {worker_above:.1} MB above idle ({:.1} MB private at idle), its reader {reader:.1} MB  (goal < 100 MB: {verdict})",
        idle as f64 / 1024.0
    );
}

/// Each batch's steps, in seconds from the first batch's claim: claimed, uploaded, created at
/// the provider, ended there, and every answer applied.
fn print_batch_timeline(c: &mut Client) {
    let rows = c
        .query(
            "WITH t0 AS (SELECT min(created_at) AS t0 FROM llmbatching.batches)
             SELECT id, to_char(extract(epoch FROM created_at - t0), 'FM990.0') || 's claimed, '
                     || coalesce(to_char(extract(epoch FROM create_attempted_at - t0), 'FM990.0'), '-') || 's uploaded, '
                     || coalesce(to_char(extract(epoch FROM submitted_at - t0), 'FM990.0'), '-') || 's created, '
                     || coalesce(to_char(extract(epoch FROM ended_at - t0), 'FM990.0'), '-') || 's ended, '
                     || coalesce(to_char(extract(epoch FROM finished_at - t0), 'FM990.0'), '-') || 's applied'
               FROM llmbatching.batches, t0 ORDER BY id",
            &[],
        )
        .unwrap();
    for row in rows {
        println!(
            "   batch {}: {}",
            row.get::<_, i64>(0),
            row.get::<_, String>(1)
        );
    }
}

/// CPU time, in seconds, from the fields of `/proc/<pid>/stat` numbered `fields` (14 utime, 15
/// stime, 16 cutime, 17 cstime: children that ended and were waited for). Counted after the
/// command's name, which may hold spaces.
fn proc_cpu_seconds(pid: &str, fields: &[usize]) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(after_name) = stat.rfind(')').map(|at| &stat[at + 2..]) else {
        return 0.0;
    };
    // After the name, field 3 comes first.
    let values: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields
        .iter()
        .filter_map(|f| values.get(f - 3)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0 // USER_HZ, 100 on Linux
}

/// CPU seconds used so far by a cluster's server: the postmaster, its processes still running,
/// and those that ended (backends, readers, writers).
fn server_cpu_seconds(cluster: &Cluster) -> f64 {
    let pid_file =
        std::fs::read_to_string(cluster.data().join("postmaster.pid")).unwrap_or_default();
    let postmaster = pid_file.lines().next().unwrap_or("").trim().to_string();
    let mut total = proc_cpu_seconds(&postmaster, &[14, 15, 16, 17]);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let parent = stat
            .rfind(')')
            .and_then(|at| stat[at + 2..].split_whitespace().nth(1));
        if parent == Some(postmaster.as_str()) {
            total += proc_cpu_seconds(&pid, &[14, 15]);
        }
    }
    total
}

/// CPU seconds used so far by this process (the emulator runs in it) and by its children that
/// ended (the by-hand script).
fn own_cpu_seconds() -> (f64, f64) {
    (
        proc_cpu_seconds("self", &[14, 15]),
        proc_cpu_seconds("self", &[16, 17]),
    )
}

/// B5: the whole job through llmbatching, then by hand with the SDK on a fresh database.
/// B5 with `n` requests; returns the seconds llmbatching and the by-hand script took.
fn b5_end_to_end(n: i64) -> Option<(f64, f64)> {
    let python = std::env::var("BENCH_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-venv/bin/python").to_string()
    });
    if !std::path::Path::new(&python).exists() {
        println!("B5 end to end: skipped, no Python with openai and psycopg at {python} (scripts/bench installs one)");
        return None;
    }
    let settings = [
        ("llmbatching.batch_max_requests", "50000"),
        ("llmbatching.poll_interval", "100ms"),
        ("llmbatching.batch_wait", "1h"),
    ];
    let cluster = Cluster::start(instant_provider(), &settings);
    let mut c = cluster.client();
    c.batch_execute(&format!(
        "CREATE EXTENSION llmbatching;
         CREATE TABLE reviews (id bigint PRIMARY KEY, body text, answer text);
         INSERT INTO reviews SELECT g, 'Classify: review ' || g FROM generate_series(1, {n}) g;"
    ))
    .unwrap();
    let (server_before, (own_before, _)) = (server_cpu_seconds(&cluster), own_cpu_seconds());
    let started = Instant::now();
    c.batch_execute(
        "SELECT llm_classify('reviews', 'answer', 'body', 'gpt-4o-mini', job => 'bench')",
    )
    .unwrap();
    let submit_seconds = started.elapsed().as_secs_f64();
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    // Poll from the client, as the by-hand script does: llm_wait would hold one snapshot for the
    // whole wait, which keeps the worker's dead rows from being pruned. The poll asks only
    // whether anything is left (counting would read the whole job each time, beside the worker):
    // a request not finished, or an answer not yet written into its row.
    while cluster.count(
        "SELECT count(*) FROM (SELECT FROM llmbatching.requests WHERE job = 'bench' AND state IN ('queued', 'submitted') LIMIT 1) s",
    ) + cluster.count("SELECT count(*) FROM (SELECT FROM llmbatching.writeback_queue LIMIT 1) q")
        > 0
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    let ours = started.elapsed().as_secs_f64();
    let ours_cpu = (
        server_cpu_seconds(&cluster) - server_before,
        own_cpu_seconds().0 - own_before,
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM reviews WHERE answer = '[gpt-4o-mini] ' || body"),
        n
    );
    let batches = cluster.count("SELECT count(*) FROM llmbatching.batches");
    println!("   llmbatching: submitting (llm_classify) took {submit_seconds:.1}s");
    print_batch_timeline(&mut c);
    for line in cluster.log().lines().filter(|l| l.contains("read back")) {
        println!(
            "   worker: {}",
            line.split("llmbatching: ").nth(1).unwrap_or(line)
        );
    }

    c.batch_execute("UPDATE reviews SET answer = NULL").unwrap();
    let (server_before, (own_before, children_before)) =
        (server_cpu_seconds(&cluster), own_cpu_seconds());
    let started = Instant::now();
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/baseline_sdk.py"
        ))
        .env("BASE_URL", &cluster.emulator.base_url)
        .env(
            "DSN",
            format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                cluster.port
            ),
        )
        .env("BATCH_SIZE", "50000")
        .output()
        .unwrap();
    let by_hand = started.elapsed().as_secs_f64();
    let (own_after, children_after) = own_cpu_seconds();
    let by_hand_cpu = (
        server_cpu_seconds(&cluster) - server_before,
        own_after - own_before,
        children_after - children_before,
    );
    assert!(
        out.status.success(),
        "baseline failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM reviews WHERE answer = '[gpt-4o-mini] ' || body"),
        n
    );
    report(
        &format!("B5 end to end ({n}, {batches} batches)"),
        ours,
        by_hand,
        "s",
        1.0,
    );
    println!(
        "   llmbatching {:.0} requests/s, by hand {:.0} requests/s",
        n as f64 / ours,
        n as f64 / by_hand
    );
    // Two cores share the work: the CPU each side used says how far apart the two jobs are
    // whatever the overlap (the bench's own polling counts with the emulator, a small part).
    println!(
        "   CPU seconds: llmbatching {:.1} (PostgreSQL {:.1}, emulator {:.1}); by hand {:.1} (PostgreSQL {:.1}, the script {:.1}, emulator {:.1})",
        ours_cpu.0 + ours_cpu.1,
        ours_cpu.0,
        ours_cpu.1,
        by_hand_cpu.0 + by_hand_cpu.1 + by_hand_cpu.2,
        by_hand_cpu.0,
        by_hand_cpu.2,
        by_hand_cpu.1
    );
    Some((ours, by_hand))
}

/// B8: B5 at two sizes; the time per request at the larger against the smaller.
fn b8_scaling(small: i64, small_run: (f64, f64), large: i64, large_run: (f64, f64)) {
    let per_request = |n: i64, seconds: f64| seconds / n as f64 * 1e6;
    let (ours_small, ours_large) = (
        per_request(small, small_run.0),
        per_request(large, large_run.0),
    );
    report(
        &format!("B8 scaling ({small} to {large})"),
        ours_large,
        ours_small,
        "us/request",
        1.0,
    );
    println!(
        "   by hand: {:.1} us/request at {small}, {:.1} at {large}",
        per_request(small, small_run.1),
        per_request(large, large_run.1)
    );
}

/// B6: WAL written per request over its whole life (submitted, claimed, answered), against
/// inserting the same rows once and updating each once with its answer.
fn b6_wal(n: i64) {
    let cluster = Cluster::start(
        instant_provider(),
        &[
            ("llmbatching.batch_wait", "1h"),
            ("llmbatching.poll_interval", "50ms"),
        ],
    );
    let mut c = cluster.client();
    c.batch_execute("CREATE EXTENSION llmbatching; CHECKPOINT")
        .unwrap();
    let start = wal_position(&mut c);
    c.batch_execute(&format!(
        "SELECT count(llm_submit('gpt-4o-mini', 'Classify: review ' || g)) FROM generate_series(1, {n}) g"
    ))
    .unwrap();
    cluster.set(&[("llmbatching.batch_wait", "0")]);
    cluster.wait_until_settled(Duration::from_secs(1200));
    let ours = wal_since(&mut c, &start);
    c.batch_execute("CREATE TABLE stored (LIKE llmbatching.requests INCLUDING ALL); CHECKPOINT")
        .unwrap();
    let start = wal_position(&mut c);
    c.batch_execute(&format!(
        "INSERT INTO stored (endpoint, model, body, request_hash)
         SELECT '/v1/responses', 'gpt-4o-mini', jsonb_build_object('model', 'gpt-4o-mini', 'input', 'Classify: review ' || g),
                sha256(int8send(g))
           FROM generate_series(1, {n}) g;
         UPDATE stored s SET state = 'completed', response = r.response, result_text = r.result_text,
                input_tokens = r.input_tokens, output_tokens = r.output_tokens, finished_at = now()
           FROM llmbatching.requests r WHERE r.id = s.id;"
    ))
    .unwrap();
    let floor = wal_since(&mut c, &start);
    report(
        &format!("B6 WAL per request ({n})"),
        ours / n as f64,
        floor / n as f64,
        "bytes",
        f64::INFINITY,
    );
}

fn wal_position(c: &mut Client) -> String {
    c.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .unwrap()
        .get(0)
}

fn wal_since(c: &mut Client, start: &str) -> f64 {
    c.query_one(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::text::pg_lsn)::float8",
        &[&start],
    )
    .unwrap()
    .get(0)
}

/// B7: 16 sessions submitting at once (pgbench), against the same sessions inserting the same
/// rows into a copy of the requests table with its indexes.
fn b7_concurrent_submit(seconds: u32) {
    let cluster = Cluster::start(instant_provider(), &[("llmbatching.batch_wait", "1h")]);
    let mut c = cluster.client();
    c.batch_execute(
        "CREATE EXTENSION llmbatching; CREATE TABLE stored (LIKE llmbatching.requests INCLUDING ALL)",
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("llmbatching-b7-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = |name: &str, sql: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("\\set r random(1, 1000000000)\n{sql}\n")).unwrap();
        path
    };
    let ours = script(
        "ours.sql",
        "SELECT llmbatching.llm_submit('gpt-4o-mini', 'Classify: review ' || :r);",
    );
    let plain = script(
        "plain.sql",
        "INSERT INTO stored (endpoint, model, body, request_hash) SELECT '/v1/responses', 'gpt-4o-mini', jsonb_build_object('model', 'gpt-4o-mini', 'input', 'Classify: review ' || :r), sha256(int8send(:r));",
    );
    let tps = |file: &std::path::Path| -> f64 {
        let out = Command::new(common::pg_bin().join("pgbench"))
            .args(["-n", "-c", "16", "-j", "2", "-T"])
            .arg(seconds.to_string())
            .args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(cluster.port.to_string())
            .arg("-f")
            .arg(file)
            .arg("postgres")
            .output()
            .expect("pgbench runs");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.starts_with("tps = "))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("pgbench: {text}{}", String::from_utf8_lossy(&out.stderr)))
    };
    // Alternating, the median of three each: the time per request is 1/tps.
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        theirs.push(1e6 / tps(&plain));
        mine.push(1e6 / tps(&ours));
    }
    report(
        "B7 16 sessions submitting",
        median(mine),
        median(theirs),
        "us/request",
        f64::INFINITY,
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick {
        Sizes {
            submit: 20_000,
            batch: 10_000,
            memory_requests: 400,
            memory_prompt_bytes: 50_000,
            end_to_end: 100_000,
        }
    } else {
        Sizes {
            submit: 100_000,
            batch: 50_000,
            memory_requests: 4_000,
            memory_prompt_bytes: 50_000,
            end_to_end: 1_000_000,
        }
    };
    let only: Vec<String> = std::env::args().filter(|a| a.starts_with('B')).collect();
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    println!(
        "llmbatching benchmarks{}: {} cores",
        if quick { " (quick)" } else { "" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    if run("B1") {
        b1_submit(sizes.submit);
    }
    if run("B2") || run("B3") {
        b2_b3_build_upload_ingest(sizes.batch);
    }
    if run("B4") {
        b4_memory(sizes.memory_requests, sizes.memory_prompt_bytes);
    }
    if run("B6") {
        b6_wal(sizes.batch);
    }
    if run("B7") {
        b7_concurrent_submit(if quick { 5 } else { 15 });
    }
    if run("B5") || run("B8") {
        let large = b5_end_to_end(sizes.end_to_end);
        if run("B8") {
            let small_size = sizes.end_to_end / 10;
            if let (Some(large), Some(small)) = (large, b5_end_to_end(small_size)) {
                b8_scaling(small_size, small, sizes.end_to_end, large);
            }
        }
    }
}
