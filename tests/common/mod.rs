//! A throwaway PostgreSQL 15 cluster with llmbatching preloaded, pointed at an in-process
//! provider emulator. Tests talk to it as any client would.
//!
//! The extension must be installed into the server's directories first (`scripts/test` does
//! it, and so does `cargo pgrx test` before its own tests). When run as root, the server runs
//! as the `postgres` OS user, since initdb refuses root.

#![allow(dead_code)]

pub use llmbatching_emulator::{Config as EmulatorConfig, Emulator};
use postgres::{Client, NoTls};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const API_KEY: &str = "sk-test-llmbatching";

/// A provider that moves batches along in a few hundred milliseconds.
pub fn quick() -> EmulatorConfig {
    EmulatorConfig {
        validating_ms: 50,
        in_progress_ms: 200,
        finalizing_ms: 50,
        ..EmulatorConfig::default()
    }
}

pub fn pg_bin() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config)
        .arg("--bindir")
        .output()
        .expect("pg_config runs");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn pkglibdir() -> PathBuf {
    let bin = pg_bin();
    let out = Command::new(bin.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .expect("pg_config runs");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Runs a server tool, as `postgres` when we are root.
pub fn pg_command(tool: &str) -> Command {
    let path = pg_bin().join(tool);
    if running_as_root() {
        let mut c = Command::new("sudo");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(mut command: Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    pub emulator: Emulator,
}

impl Cluster {
    /// Starts a cluster with fast test timings; `settings` are added to postgresql.conf.
    pub fn start(emulator: EmulatorConfig, settings: &[(&str, &str)]) -> Cluster {
        assert!(
            pkglibdir().join("llmbatching.so").exists(),
            "llmbatching is not installed in {}; run scripts/test, or cargo pgrx install first",
            pkglibdir().display()
        );
        let emulator = Emulator::start(emulator).expect("emulator starts");
        // A counter, not only a free port (two tests may be handed the same one): each cluster
        // of this process gets a directory of its own.
        static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "llmbatching-test-{}-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        if running_as_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&dir);
            run(chown, "chown");
        }
        let data = dir.join("data");
        let mut initdb = pg_command("initdb");
        initdb
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data);
        run(initdb, "initdb");

        let port = free_port();
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{dir}'\n\
             fsync = off\nshared_preload_libraries = 'llmbatching'\n\
             search_path = '\"$user\", public, llmbatching'\n\
             llmbatching.api_base = '{base}'\nllmbatching.api_key_file = 'llmbatching.key'\n\
             llmbatching.batch_wait = '200ms'\nllmbatching.poll_interval = '100ms'\n",
            dir = dir.display(),
            base = emulator.base_url
        );
        for (name, value) in settings {
            conf.push_str(&format!("{name} = '{value}'\n"));
        }
        append_as_owner(&data.join("postgresql.conf"), &conf);
        let mut cluster = Cluster {
            dir,
            port,
            emulator,
        };
        // The key is read from a file only the server's OS user can read (it is no setting).
        cluster.write_server_file("llmbatching.key", &format!("{API_KEY}\n"), "600");
        // A free port can be taken by another test's server between choosing and starting:
        // then start again on another one (the last `port` line of the file counts).
        for _ in 0..3 {
            if cluster.try_pg_ctl(&["start", "-w", "-t", "60"]) {
                return cluster;
            }
            cluster.port = free_port();
            append_as_owner(
                &data.join("postgresql.conf"),
                &format!("port = {}\n", cluster.port),
            );
        }
        cluster.pg_ctl(&["start", "-w", "-t", "60"]);
        cluster
    }

    /// A quick cluster with the extension already created.
    pub fn with_extension(settings: &[(&str, &str)]) -> Cluster {
        Cluster::with_extension_and(quick(), settings)
    }

    /// A cluster with the extension already created, and its worker running.
    pub fn with_extension_and(emulator: EmulatorConfig, settings: &[(&str, &str)]) -> Cluster {
        let cluster = Cluster::start(emulator, settings);
        cluster
            .client()
            .batch_execute("CREATE EXTENSION llmbatching")
            .unwrap();
        cluster.worker_pid();
        cluster
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn pg_ctl_command(&self, args: &[&str]) -> Command {
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.log_path())
            .args(args);
        c
    }

    fn try_pg_ctl(&self, args: &[&str]) -> bool {
        self.pg_ctl_command(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    pub fn pg_ctl(&self, args: &[&str]) {
        run(self.pg_ctl_command(args), &format!("pg_ctl {args:?}"));
    }

    /// Restarts the server; `mode` is pg_ctl's shutdown mode (`fast`, `immediate`).
    pub fn restart(&self, mode: &str) {
        self.pg_ctl(&["restart", "-w", "-t", "60", "-m", mode]);
    }

    pub fn client(&self) -> Client {
        self.client_as("postgres")
    }

    /// A client whose NOTICE messages are collected into `notices`.
    pub fn client_with_notices(
        &self,
        notices: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> Client {
        let mut config: postgres::Config = self.connection_string("postgres").parse().unwrap();
        config.notice_callback(move |notice| {
            notices.lock().unwrap().push(notice.message().to_owned())
        });
        config.connect(NoTls).unwrap()
    }

    fn connection_string(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname=postgres",
            self.port
        )
    }

    pub fn client_as(&self, user: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match Client::connect(&self.connection_string(user), NoTls) {
                Ok(c) => return c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot connect: {e}"),
            }
        }
    }

    /// The worker's pid, waiting for it to be up.
    pub fn worker_pid(&self) -> i32 {
        let mut c = self.client();
        self.wait_for("the worker to start", Duration::from_secs(30), || {
            c.query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'llmbatching worker'",
                &[],
            )
            .ok()
            .flatten()
            .is_some()
        });
        c.query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'llmbatching worker'",
            &[],
        )
        .unwrap()
        .get(0)
    }

    /// Polls `done` until it holds, failing the test after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a query returning one count.
    pub fn count(&self, sql: &str) -> i64 {
        self.client().query_one(sql, &[]).unwrap().get(0)
    }

    /// Waits until some batch is at the provider, being worked on.
    pub fn wait_for_a_submitted_batch(&self) {
        let mut c = self.client();
        self.wait_for("a batch to be submitted", Duration::from_secs(60), || {
            c.query_one(
                "SELECT count(*) FROM llmbatching.batches WHERE state = 'submitted'",
                &[],
            )
            .map(|r| r.get::<_, i64>(0) > 0)
            .unwrap_or(false)
        });
    }

    /// Waits until no request is queued or submitted.
    pub fn wait_until_settled(&self, timeout: Duration) {
        let mut c = self.client();
        self.wait_for("every request to finish", timeout, || {
            match c.query_one(
                "SELECT count(*) FROM llmbatching.requests WHERE state IN ('queued', 'submitted')",
                &[],
            ) {
                Ok(row) => row.get::<_, i64>(0) == 0,
                Err(_) => {
                    c = self.client();
                    false
                }
            }
        });
    }

    /// Changes settings with ALTER SYSTEM and reloads.
    pub fn set(&self, settings: &[(&str, &str)]) {
        let mut c = self.client();
        for (name, value) in settings {
            c.batch_execute(&format!("ALTER SYSTEM SET {name} = '{value}'"))
                .unwrap();
        }
        c.batch_execute("SELECT pg_reload_conf()").unwrap();
    }

    /// Writes a file into the data directory as the server's OS user, with `mode`.
    pub fn write_server_file(&self, name: &str, content: &str, mode: &str) {
        let path = self.data().join(name);
        append_as_owner(&path, content);
        let mut chmod = if running_as_root() {
            let mut c = Command::new("sudo");
            c.args(["-u", "postgres", "--", "chmod", mode]);
            c
        } else {
            let mut c = Command::new("chmod");
            c.arg(mode);
            c
        };
        chmod.arg(&path);
        run(chmod, "chmod");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

pub fn append_as_owner(path: &Path, text: &str) {
    if running_as_root() {
        let mut c = Command::new("sudo");
        c.args(["-u", "postgres", "--", "sh", "-c"])
            .arg(format!("cat >> '{}'", path.display()));
        c.stdin(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    } else {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- server log (last lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate"]);
        let _ = c.output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
