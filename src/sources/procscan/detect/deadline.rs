//! Reads that may block, run on a worker thread and waited for with a deadline.
//!
//! Some /proc and cgroup reads take kernel locks a hung task may hold (`cgroup` takes the
//! cgroup mutex, `stack` and `syscall` the task's exec lock). A read that misses its deadline
//! leaves its worker blocked: the worker is abandoned (it exits by itself if the read ever
//! returns) and the next read gets a fresh one. Abandoned workers are bounded, and so are
//! timeouts per scan, so a scan's time stays bounded even if every read hangs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

/// Why a job gave no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRun {
    /// It ran past the deadline and was abandoned.
    TimedOut,
    /// Not started: too many workers are already abandoned, or too many reads timed out in
    /// this scan, or no thread could be started.
    Skipped,
    /// The job panicked.
    Failed,
}

type Job = Box<dyn FnOnce() + Send>;

pub struct DeadlineRunner {
    deadline: Duration,
    max_abandoned: usize,
    /// Worker threads alive, the current one included.
    alive: Arc<AtomicUsize>,
    current: Option<mpsc::Sender<Job>>,
    timeouts_this_scan: usize,
}

/// Decrements the live-worker count however the worker ends.
struct AliveGuard(Arc<AtomicUsize>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl DeadlineRunner {
    pub fn new(deadline: Duration, max_abandoned: usize) -> DeadlineRunner {
        DeadlineRunner {
            deadline,
            max_abandoned,
            alive: Arc::default(),
            current: None,
            timeouts_this_scan: 0,
        }
    }

    /// Reset the per-scan timeout budget.
    pub fn begin_scan(&mut self) {
        self.timeouts_this_scan = 0;
    }

    /// Workers still blocked in a read that missed its deadline.
    pub fn abandoned(&self) -> usize {
        self.alive
            .load(Ordering::Relaxed)
            .saturating_sub(usize::from(self.current.is_some()))
    }

    /// Run `job` on the worker and wait at most the deadline for its result.
    pub fn run<T: Send + 'static>(
        &mut self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NotRun> {
        if self.timeouts_this_scan >= self.max_abandoned {
            return Err(NotRun::Skipped);
        }
        let worker = self.worker().ok_or(NotRun::Skipped)?;
        let (result_tx, result_rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            // The waiter is gone if the deadline passed: the result is dropped.
            let _ = result_tx.send(job());
        });
        if worker.send(job).is_err() {
            self.current = None;
            return Err(NotRun::Failed);
        }
        match result_rx.recv_timeout(self.deadline) {
            Ok(value) => Ok(value),
            Err(RecvTimeoutError::Timeout) => {
                self.current = None;
                self.timeouts_this_scan += 1;
                Err(NotRun::TimedOut)
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.current = None;
                Err(NotRun::Failed)
            }
        }
    }

    fn worker(&mut self) -> Option<&mpsc::Sender<Job>> {
        if self.current.is_none() {
            if self.abandoned() >= self.max_abandoned {
                return None;
            }
            let (tx, rx) = mpsc::channel::<Job>();
            self.alive.fetch_add(1, Ordering::Relaxed);
            let guard = AliveGuard(self.alive.clone());
            let spawned = std::thread::Builder::new()
                .name("hangwatch-procread".into())
                .stack_size(256 * 1024)
                .spawn(move || {
                    let _guard = guard;
                    // Ends when the runner drops the sender: dropped or abandoned this worker.
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a /proc reader thread");
                return None;
            }
            self.current = Some(tx);
        }
        self.current.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn fast_jobs_return_their_value_on_one_worker() {
        let mut runner = DeadlineRunner::new(Duration::from_secs(5), 2);
        assert_eq!(runner.run(|| 1 + 1), Ok(2));
        assert_eq!(runner.run(|| "x".to_string()), Ok("x".to_string()));
        assert_eq!(runner.abandoned(), 0);
        assert_eq!(runner.alive.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn blocked_jobs_are_abandoned_capped_and_recover() {
        let mut runner = DeadlineRunner::new(Duration::from_millis(50), 2);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let blocked = |rx: Arc<std::sync::Mutex<mpsc::Receiver<()>>>| {
            move || {
                let _ = rx.lock().map(|r| r.recv());
            }
        };
        let start = Instant::now();
        assert_eq!(
            runner.run(blocked(release_rx.clone())),
            Err(NotRun::TimedOut)
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        // A new worker answers while the first is stuck.
        assert_eq!(runner.run(|| 5), Ok(5));
        assert_eq!(
            runner.run(blocked(release_rx.clone())),
            Err(NotRun::TimedOut)
        );
        assert_eq!(runner.abandoned(), 2);
        // The cap is reached: nothing more runs, and it says so at once.
        let start = Instant::now();
        assert_eq!(runner.run(|| 6), Err(NotRun::Skipped));
        assert!(start.elapsed() < Duration::from_millis(40));
        // The stuck reads return: the abandoned workers exit and reads run again.
        release_tx.send(()).unwrap();
        release_tx.send(()).unwrap();
        wait_until("abandoned workers exit", || runner.abandoned() == 0);
        runner.begin_scan();
        assert_eq!(runner.run(|| 7), Ok(7));
    }

    #[test]
    fn timeouts_per_scan_are_bounded_even_if_workers_recover() {
        let mut runner = DeadlineRunner::new(Duration::from_millis(20), 1);
        let slow = || std::thread::sleep(Duration::from_millis(60));
        assert_eq!(runner.run(slow), Err(NotRun::TimedOut));
        wait_until("slow worker exits", || runner.abandoned() == 0);
        assert_eq!(runner.run(|| 1), Err(NotRun::Skipped));
        runner.begin_scan();
        assert_eq!(runner.run(|| 1), Ok(1));
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_next_job_runs() {
        let mut runner = DeadlineRunner::new(Duration::from_secs(5), 2);
        assert_eq!(
            runner.run(|| -> u8 { panic!("job panics") }),
            Err(NotRun::Failed)
        );
        assert_eq!(runner.run(|| 3), Ok(3));
    }
}
