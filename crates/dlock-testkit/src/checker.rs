//! The mutual-exclusion checker: many clients, many acquisitions, one fenced resource.

use std::time::Duration;

use dlock_core::{LockError, Locker};
use tokio::task::JoinSet;

use crate::fenced::{FencedResource, HistoryReport};

/// How hard [`check_mutual_exclusion`] pushes.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CheckerConfig {
    /// Concurrent tasks (default 16).
    pub tasks: usize,
    /// Acquisitions each task makes (default 200).
    pub acquisitions_per_task: usize,
    /// Lease length of every acquisition (default 5 s).
    pub ttl: Duration,
    /// How long one acquisition may wait (default 60 s).
    pub wait: Duration,
    /// Time spent inside each critical section (default zero: the task only
    /// yields to the scheduler a few times, which is enough for an overlap to show).
    pub hold: Duration,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        CheckerConfig {
            tasks: 16,
            acquisitions_per_task: 200,
            ttl: Duration::from_secs(5),
            wait: Duration::from_secs(60),
            hold: Duration::ZERO,
        }
    }
}

impl CheckerConfig {
    /// Sets the number of tasks and acquisitions per task.
    pub fn load(mut self, tasks: usize, acquisitions_per_task: usize) -> Self {
        self.tasks = tasks;
        self.acquisitions_per_task = acquisitions_per_task;
        self
    }

    /// Sets the lease length.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets how long one acquisition may wait.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Sets the time spent inside each critical section.
    pub fn hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }
}

/// What [`check_mutual_exclusion`] saw.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct CheckReport {
    /// Acquisitions that returned a guard.
    pub acquired: usize,
    /// Acquisitions that returned an error.
    pub failed: usize,
    /// Releases that returned an error other than `NotHeld`.
    pub failed_releases: usize,
    /// Releases that found the lock no longer theirs (lost during the section).
    pub not_held_releases: usize,
    /// The first few errors, as text.
    pub errors: Vec<String>,
    /// The fenced resource's verdict on the history.
    pub history: HistoryReport,
}

impl CheckReport {
    /// Panics with the report when any acquisition failed or the history is not clean.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(
            self.history.is_clean()
                && self.failed == 0
                && self.failed_releases == 0
                && self.not_held_releases == 0,
            "mutual exclusion check failed: {self:#?}"
        );
    }

    /// Panics with the report when safety was violated: overlapping
    /// accepted writes, tokens that did not increase, acquisitions that
    /// failed, or releases that errored. Unlike [`assert_clean`](Self::assert_clean)
    /// it accepts releases that found the lock already gone: under injected
    /// faults a lease may end, and the holder is told so.
    #[track_caller]
    pub fn assert_safe(&self) {
        assert!(
            self.history.is_clean() && self.failed == 0 && self.failed_releases == 0,
            "mutual exclusion check failed: {self:#?}"
        );
    }
}

/// Runs `config.tasks` tasks that each acquire `key` `config.acquisitions_per_task`
/// times, enter a [`FencedResource`] with the fencing token, hold for
/// `config.hold`, leave, and release. Task `i` uses `lockers[i % lockers.len()]`,
/// so several lockers act as several client processes.
///
/// ```
/// use dlock_core::Locker;
/// use dlock_testkit::{CheckerConfig, MemoryBackend, check_mutual_exclusion};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let backend = MemoryBackend::new();
/// let lockers: Vec<Locker> = (0..4).map(|_| Locker::new(backend.clone())).collect();
/// let report = check_mutual_exclusion(&lockers, "checker/doc", CheckerConfig::default().load(4, 25)).await;
/// report.assert_clean();
/// assert_eq!(report.acquired, 100);
/// # }
/// ```
pub async fn check_mutual_exclusion(lockers: &[Locker], key: &str, config: CheckerConfig) -> CheckReport {
    assert!(
        !lockers.is_empty(),
        "check_mutual_exclusion needs at least one locker"
    );
    let resource = FencedResource::new();
    let mut tasks = JoinSet::new();
    for client in 0..config.tasks {
        let locker = lockers[client % lockers.len()].clone();
        let resource = resource.clone();
        let key = key.to_owned();
        let config = config.clone();
        tasks.spawn(async move { run_client(client, &locker, &key, &resource, &config).await });
    }
    let mut report = CheckReport::default();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(client) => {
                report.acquired += client.acquired;
                report.failed += client.errors.len() - client.failed_releases;
                report.failed_releases += client.failed_releases;
                report.not_held_releases += client.not_held_releases;
                for error in client.errors {
                    if report.errors.len() < 10 {
                        report.errors.push(error);
                    }
                }
            }
            Err(join_error) => {
                report.failed += 1;
                report.errors.push(format!("a checker task died: {join_error}"));
            }
        }
    }
    report.history = resource.check();
    report
}

#[derive(Default)]
struct ClientOutcome {
    acquired: usize,
    failed_releases: usize,
    not_held_releases: usize,
    errors: Vec<String>,
}

async fn run_client(
    client: usize,
    locker: &Locker,
    key: &str,
    resource: &FencedResource,
    config: &CheckerConfig,
) -> ClientOutcome {
    let mut outcome = ClientOutcome::default();
    for _ in 0..config.acquisitions_per_task {
        let guard = match locker.lock(key).ttl(config.ttl).wait(config.wait).await {
            Ok(guard) => guard,
            Err(error) => {
                outcome.errors.push(format!("client {client}: acquire: {error}"));
                continue;
            }
        };
        outcome.acquired += 1;
        // A stale token is fencing doing its job; the history counts it.
        if let Ok(section) = resource.enter(client, guard.fencing_token()) {
            if config.hold.is_zero() {
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
            } else {
                tokio::time::sleep(config.hold).await;
            }
            section.exit();
        }
        match guard.release().await {
            Ok(()) => {}
            Err(LockError::NotHeld { .. }) => outcome.not_held_releases += 1,
            Err(error) => {
                outcome.failed_releases += 1;
                outcome.errors.push(format!("client {client}: release: {error}"));
            }
        }
    }
    outcome
}
