//! The network half of the batch steps, run on threads beside the worker's main thread, so that
//! one slow or stalled transfer never holds up the other batches' steps, the write-backs, a
//! reload of the configuration or the worker's answer to a signal.
//!
//! The main thread keeps everything that touches PostgreSQL: it prepares a step (writes the
//! input file, records that a create call is about to be made), hands the provider calls to
//! [`Transfers::start`], and applies in its own transactions what [`Transfers::landed`] returns.
//! Code here never calls into PostgreSQL, and its threads start with every signal blocked, so
//! PostgreSQL's signal handlers always run on the main thread.
//!
//! Nothing is lost when the worker stops with transfers under way: every step is recorded
//! before its calls are made, and a call whose result was never recorded is made again (see
//! `worker`).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

/// Set when the worker stops: every call under way ends at its next check (see
/// [`should_stop`]).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether calls under way should end now: the worker is stopping.
pub fn should_stop() -> bool {
    // SAFETY: a sig_atomic_t that PostgreSQL's SIGTERM handler sets, read volatile as PostgreSQL
    // reads it; a plain load, no call into PostgreSQL.
    STOPPING.load(Ordering::Relaxed)
        || unsafe { std::ptr::read_volatile(&raw const pgrx::pg_sys::ShutdownRequestPending) != 0 }
}

/// What a transfer thread hands back: its work's value, or the message of a panic in it.
pub type Outcome<T> = Result<T, String>;

/// The transfers under way, one at most per batch, keyed by batch id.
pub struct Transfers<T> {
    in_flight: HashMap<i64, &'static str>,
    sender: Sender<(i64, Outcome<T>)>,
    receiver: Receiver<(i64, Outcome<T>)>,
    /// Outcomes received while checking for them, not yet handed out.
    arrived: Vec<(i64, Outcome<T>)>,
}

impl<T: Send + 'static> Transfers<T> {
    pub fn new() -> Self {
        let (sender, receiver) = channel();
        Transfers {
            in_flight: HashMap::new(),
            sender,
            receiver,
            arrived: Vec::new(),
        }
    }

    /// Whether the batch has a transfer under way.
    pub fn busy(&self, batch: i64) -> bool {
        self.in_flight.contains_key(&batch)
    }

    /// The batches with a transfer under way.
    pub fn busy_batches(&self) -> Vec<i64> {
        self.in_flight.keys().copied().collect()
    }

    pub fn count(&self) -> usize {
        self.in_flight.len()
    }

    /// What each transfer under way is doing, for `pg_stat_activity`.
    pub fn describe(&self) -> String {
        let mut steps: Vec<String> = self
            .in_flight
            .iter()
            .map(|(batch, step)| format!("batch {batch} {step}"))
            .collect();
        steps.sort();
        steps.join(", ")
    }

    /// Runs `work` (provider calls, local files; never PostgreSQL) on a thread of its own.
    pub fn start(
        &mut self,
        batch: i64,
        step: &'static str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<()> {
        let sender = self.sender.clone();
        spawn_without_signals(move || {
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(work))
                .map_err(|panic| panic_message(&panic));
            // The receiver is gone only when the worker is exiting.
            let _ = sender.send((batch, outcome));
        })?;
        self.in_flight.insert(batch, step);
        Ok(())
    }

    /// Whether some transfer has ended since outcomes were last handed out.
    pub fn any_landed(&mut self) -> bool {
        self.arrived.extend(self.receiver.try_iter());
        !self.arrived.is_empty()
    }

    /// The outcomes of the transfers that ended, each with its batch and step.
    pub fn landed(&mut self) -> Vec<(i64, &'static str, Outcome<T>)> {
        self.arrived.extend(self.receiver.try_iter());
        std::mem::take(&mut self.arrived)
            .into_iter()
            .map(|(batch, outcome)| {
                let step = self.in_flight.remove(&batch).unwrap_or("transfer");
                (batch, step, outcome)
            })
            .collect()
    }

    /// Asks every transfer to end, and waits at most `patience` for them; returns the outcomes
    /// that arrived meanwhile.
    pub fn stop(&mut self, patience: Duration) -> Vec<(i64, &'static str, Outcome<T>)> {
        STOPPING.store(true, Ordering::Relaxed);
        let until = Instant::now() + patience;
        let mut ended = Vec::new();
        while self.count() > 0 && Instant::now() < until {
            if let Ok(outcome) = self.receiver.recv_timeout(Duration::from_millis(50)) {
                self.arrived.push(outcome);
            }
            ended.extend(self.landed());
        }
        ended
    }
}

/// Starts a thread with every signal blocked (it inherits the mask of the thread that creates
/// it, and so do the threads it creates in turn), so that a signal is never handled there: the
/// handlers call into PostgreSQL, which only the main thread may do.
fn spawn_without_signals(work: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    // SAFETY: pthread_sigmask on the calling thread, restored before returning.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let spawned = std::thread::Builder::new()
            .name("llmbatching transfer".into())
            .spawn(work);
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        spawned.map(|_| ())
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a transfer failed unexpectedly".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for_all(transfers: &mut Transfers<u32>) -> Vec<(i64, &'static str, Outcome<u32>)> {
        let until = Instant::now() + Duration::from_secs(10);
        let mut all = Vec::new();
        while transfers.count() > 0 && Instant::now() < until {
            all.extend(transfers.landed());
            std::thread::sleep(Duration::from_millis(5));
        }
        all.sort_by_key(|(batch, _, _)| *batch);
        all
    }

    #[test]
    fn a_slow_transfer_does_not_hold_back_a_quick_one() {
        let mut transfers = Transfers::new();
        let (release, hold) = channel::<()>();
        transfers
            .start(1, "download", move || {
                let _ = hold.recv_timeout(Duration::from_secs(10));
                1
            })
            .unwrap();
        transfers.start(2, "poll", || 2).unwrap();
        assert!(transfers.busy(1) && transfers.busy(2));
        let until = Instant::now() + Duration::from_secs(10);
        let mut quick = Vec::new();
        while quick.is_empty() && Instant::now() < until {
            quick = transfers.landed();
        }
        assert_eq!(quick.len(), 1);
        assert_eq!((quick[0].0, quick[0].1), (2, "poll"));
        assert!(transfers.busy(1) && !transfers.busy(2));
        release.send(()).unwrap();
        let rest = wait_for_all(&mut transfers);
        assert_eq!(rest[0].2, Ok(1));
    }

    #[test]
    fn a_panic_becomes_an_outcome() {
        let mut transfers = Transfers::<u32>::new();
        transfers
            .start(7, "upload", || panic!("the file vanished"))
            .unwrap();
        let ended = wait_for_all(&mut transfers);
        assert_eq!(ended[0].0, 7);
        assert_eq!(ended[0].2, Err("the file vanished".to_string()));
        assert_eq!(transfers.count(), 0);
    }
}
