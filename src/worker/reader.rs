//! Reading a batch back in a process of its own: the reader.
//!
//! Applying a batch's answers to its requests is the longest step the worker takes (about two
//! seconds for 50,000 answers). When a batch's result files are downloaded, the worker starts a
//! reader, a dynamic background worker that applies them (see `reading`) and ends, while the
//! worker goes on claiming, uploading and polling. One reader runs at a time; while it does, or
//! when none can start (`max_worker_processes` reached), the worker reads the batch itself.
//!
//! The worker leaves the batch alone while its reader runs. A reader that fails records the
//! failed step as the worker would; one that is stopped (the worker stopped, or a command wants
//! the database to itself) stops after the chunk it is applying and records nothing, and the
//! batch is downloaded and read again: only requests still `submitted` in it are updated, so
//! reading it twice is harmless. A worker that starts first ends the readers a worker before it
//! left (see [`end_leftover_readers`]), so that no two processes read one batch. (The worker
//! may meanwhile apply answers of the batch kept aside while their roles held their requests
//! locked, see `state::held`: each reading only changes requests still `submitted`, under a
//! row lock, so the two never apply one answer twice.)

use super::reading::{remove_files, Reading};
use super::{
    catching, connect_process, launch_process, record_step_failure, report_activity, result_file,
    shutdown_requested, staging_dir, still_runs, tx, wait_latch,
};
use crate::config::Settings;
use crate::provider::servers;
use crate::provider::ProviderError;
use crate::registry;
use crate::state;
use crate::state::housekeeping;
use pgrx::bgworkers::{BackgroundWorker, DynamicBackgroundWorker};
use pgrx::prelude::*;
use std::path::PathBuf;
use std::time::Duration;

/// The reader the worker started, and the batch it reads, while it may still run.
#[derive(Default)]
pub struct Reader {
    current: Option<(i64, DynamicBackgroundWorker)>,
}

impl Reader {
    /// Whether a reader this worker started reads `batch_id` (or is starting to).
    pub fn busy(&self, batch_id: i64) -> bool {
        self.reading() == Some(batch_id)
    }

    /// The batch the reader reads, if one runs.
    pub fn reading(&self) -> Option<i64> {
        self.current.as_ref().map(|(id, _)| *id)
    }

    /// The batch of a reader that ended since the last call, if one did.
    pub fn ended(&mut self) -> Option<i64> {
        let (id, handle) = self.current.as_ref()?;
        if still_runs(handle) {
            return None;
        }
        let id = *id;
        self.current = None;
        Some(id)
    }

    /// Starts a reader for a batch whose result `files` were downloaded (in `downloading`);
    /// false when none can start now: one runs already, no worker slot is free, or a command
    /// wants the database to itself.
    pub fn hand_over(&mut self, batch_id: i64, files: &[PathBuf], downloading: Duration) -> bool {
        if self.current.is_some() || registry::database_wanted_alone() {
            return false;
        }
        let Some(task) = Task::describe(batch_id, files, downloading) else {
            return false;
        };
        let database = unsafe { pg_sys::MyDatabaseId };
        match launch_process(
            "llmbatching reader",
            "llmbatching_reader_main",
            database,
            Some(&task),
        ) {
            Ok(handle) => {
                self.current = Some((batch_id, handle));
                true
            }
            Err(()) => false,
        }
    }

    /// Ends the reader, if one runs: a worker that stops takes it with it (its successor
    /// downloads the batch again).
    pub fn stop(&mut self) {
        if let Some((_, handle)) = self.current.take() {
            let _ = handle.terminate();
        }
    }
}

/// What a reader is to read, passed to it as text (`bgw_extra`): the batch, how long its
/// download took (for the log), and which of its result files were downloaded, as in
/// `17 250 output error`.
#[derive(Debug, PartialEq)]
struct Task {
    batch: i64,
    downloading: Duration,
    kinds: Vec<String>,
}

/// The result files a batch may have (see `result_file`).
const FILE_KINDS: [&str; 2] = ["output", "error"];

impl Task {
    /// The task of reading `files`, which must be the batch's result files in the staging
    /// directory; None for any other file.
    fn describe(batch: i64, files: &[PathBuf], downloading: Duration) -> Option<String> {
        let staging = staging_dir();
        let kinds = files
            .iter()
            .map(|path| {
                FILE_KINDS
                    .into_iter()
                    .find(|kind| result_file(&staging, batch, kind) == *path)
            })
            .collect::<Option<Vec<_>>>()?;
        Some(format!(
            "{batch} {} {}",
            downloading.as_millis(),
            kinds.join(" ")
        ))
    }

    fn parse(text: &str) -> Option<Task> {
        let mut words = text.split_whitespace();
        let batch = words.next()?.parse().ok()?;
        let downloading = Duration::from_millis(words.next()?.parse().ok()?);
        let kinds = words
            .map(|kind| FILE_KINDS.contains(&kind).then(|| kind.to_owned()))
            .collect::<Option<Vec<_>>>()?;
        Some(Task {
            batch,
            downloading,
            kinds,
        })
    }

    fn files(&self) -> Vec<PathBuf> {
        let staging = staging_dir();
        self.kinds
            .iter()
            .map(|kind| result_file(&staging, self.batch, kind))
            .collect()
    }
}

/// A reader stops between two chunks when it is to end, or a command wants the database.
fn stop_wanted() -> bool {
    shutdown_requested() || registry::database_wanted_alone()
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn llmbatching_reader_main(arg: pg_sys::Datum) {
    connect_process(arg);
    match Task::parse(BackgroundWorker::get_extra()) {
        Some(task) => read(task),
        None => warning!("llmbatching: a reader was started without a batch to read"),
    }
    // SAFETY: PostgreSQL's own way out of a process.
    unsafe { pg_sys::proc_exit(0) };
}

/// Reads the task's batch back, if it still waits for that; its files are removed afterwards.
/// A reading that fails is recorded as the batch's failed step, as the worker records it (the
/// batch is downloaded again after a pause), unless the reader is stopping.
fn read(task: Task) {
    let files = task.files();
    let id = task.batch;
    let batch = catching(move || tx(move || state::batch(id)))
        .ok()
        .flatten();
    let Some(batch) = batch.filter(|b| b.state == "ingesting" && !stop_wanted()) else {
        remove_files(&files);
        return;
    };
    report_activity(&format!("llmbatching: reading back batch {id}"));
    let settings = Settings::current();
    let (provider, account) = batch.route();
    let server = catching(move || tx(move || servers::server_for_worker(&provider, &account)))
        .unwrap_or_else(Err);
    let (failed, message) = match server {
        Ok(server) => {
            let reading = Reading::new(
                &batch,
                server.kind,
                vec![server.api_key],
                &settings,
                stop_wanted,
            );
            // An error in the database on the way is the batch's failed step, as in the worker.
            let outcome = catching(|| reading.finish(&files, task.downloading))
                .unwrap_or_else(|message| Err(ProviderError::Database(message)));
            match outcome {
                Ok(()) => return,
                Err(e) => {
                    let message = match e {
                        ProviderError::Held(_) => e.to_string(),
                        _ => reading.redact(&format!("download failed: {e}")),
                    };
                    (e, message)
                }
            }
        }
        Err(problem) => {
            remove_files(&files);
            let message = format!("reading back failed: {problem}");
            (ProviderError::Local(problem), message)
        }
    };
    // (A reading cut short because the process is to stop is left to the next one.)
    if !stop_wanted() {
        if let Err(e) = catching(|| record_step_failure(&batch, &message, &failed, &settings)) {
            warning!("llmbatching: batch {id}: recording its failed reading failed: {e}");
        }
    }
}

/// Ends the readers of this database that a worker before this one started and did not stop
/// (it ended on an error), and waits until they are gone, at most `patience`: they stop after
/// the chunk they are applying. Otherwise one could still read a batch that this worker
/// downloads again into the same files. False if one is still there.
pub fn end_leftover_readers(patience: Duration) -> bool {
    let until = std::time::Instant::now() + patience;
    loop {
        let left = catching(|| tx(housekeeping::end_readers)).unwrap_or(1);
        if left == 0 {
            return true;
        }
        if std::time::Instant::now() >= until || shutdown_requested() {
            return false;
        }
        wait_latch(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_reads_back_as_written() {
        let task = Task::parse("17 250 output error").unwrap();
        assert_eq!(
            task,
            Task {
                batch: 17,
                downloading: Duration::from_millis(250),
                kinds: vec!["output".into(), "error".into()],
            }
        );
        assert_eq!(Task::parse("17 0").unwrap().kinds, Vec::<String>::new());
    }

    #[test]
    fn a_task_names_only_result_files() {
        assert_eq!(Task::parse("17 250 ../../etc/passwd"), None);
        assert_eq!(Task::parse("x 250 output"), None);
        assert_eq!(Task::parse(""), None);
    }
}
