//! The mutual-exclusion checker: many clients, many acquisitions, one fenced resource.

use std::time::Duration;

use dlock_core::{LockError, Locker};
use tokio::task::JoinSet;

use crate::fenced::{FencedResource, HistoryReport};
use crate::rw_checker::{Span, tokens_out_of_order};

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
    /// For [`check_read_write`](crate::check_read_write): the share of
    /// acquisitions that are reads, in percent (default 90).
    pub read_percent: u8,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        CheckerConfig {
            tasks: 16,
            acquisitions_per_task: 200,
            ttl: Duration::from_secs(5),
            wait: Duration::from_secs(60),
            hold: Duration::ZERO,
            read_percent: 90,
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

    /// Sets the share of reads for [`check_read_write`](crate::check_read_write), in percent (capped at 100).
    pub fn read_percent(mut self, percent: u8) -> Self {
        self.read_percent = percent.min(100);
        self
    }
}

/// A critical section's time inside: `hold`, or with none a few yields to
/// the scheduler, which is enough for an overlap to show.
pub(crate) async fn stay_inside(hold: Duration) {
    if hold.is_zero() {
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
    } else {
        tokio::time::sleep(hold).await;
    }
}

/// Adds `more` to a report's errors, keeping the first 10.
pub(crate) fn keep_first_errors(errors: &mut Vec<String>, more: Vec<String>) {
    let room = 10usize.saturating_sub(errors.len());
    errors.extend(more.into_iter().take(room));
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
                keep_first_errors(&mut report.errors, client.errors);
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
            stay_inside(config.hold).await;
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

/// What [`check_semaphore`] saw.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SemaphoreReport {
    /// The semaphore's limit.
    pub permits: u32,
    /// Acquisitions that returned a permit.
    pub acquired: usize,
    /// Acquisitions or releases that returned an error.
    pub failed: usize,
    /// The most holders seen inside at once.
    pub most_inside: usize,
    /// Times a holder entered while `permits` others were inside already.
    pub over_admissions: usize,
    /// Tokens handed out twice.
    pub repeated_tokens: usize,
    /// Permits whose token was not above the token of a permit released
    /// before they were asked for.
    pub tokens_out_of_order: usize,
    /// The first few errors, as text.
    pub errors: Vec<String>,
}

impl SemaphoreReport {
    /// Panics with the report unless every acquisition worked, no more than
    /// `permits` holders were ever inside at once, and the tokens were
    /// unique and increasing.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(
            self.failed == 0
                && self.over_admissions == 0
                && self.repeated_tokens == 0
                && self.tokens_out_of_order == 0
                && self.most_inside <= self.permits as usize,
            "semaphore check failed: {self:#?}"
        );
    }
}

/// Runs `config.tasks` tasks that each take a permit of the semaphore
/// `key` (limit `permits`) `config.acquisitions_per_task` times, stay inside
/// for `config.hold`, and release. A task counts itself inside from the
/// moment its permit is granted until it calls release, a span within the
/// permit's lease, so more than `permits` inside at once is a real
/// over-admission. Tokens must be unique, and a permit asked for after
/// another was released must carry a higher token.
///
/// ```
/// use dlock_core::Locker;
/// use dlock_testkit::{CheckerConfig, MemoryBackend, check_semaphore};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let backend = MemoryBackend::new();
/// let lockers: Vec<Locker> = (0..4).map(|_| Locker::new(backend.clone())).collect();
/// let config = CheckerConfig::default().load(8, 25).hold(std::time::Duration::from_millis(1));
/// let report = check_semaphore(&lockers, "checker/semaphore-doc", 3, config).await;
/// report.assert_clean();
/// assert_eq!(report.acquired, 200);
/// assert!(report.most_inside <= 3);
/// # }
/// ```
pub async fn check_semaphore(
    lockers: &[Locker],
    key: &str,
    permits: u32,
    config: CheckerConfig,
) -> SemaphoreReport {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};

    assert!(!lockers.is_empty(), "check_semaphore needs at least one locker");
    let inside = Arc::new(AtomicUsize::new(0));
    let most_inside = Arc::new(AtomicUsize::new(0));
    let over_admissions = Arc::new(AtomicUsize::new(0));
    let spans = Arc::new(Mutex::new(Vec::<Span>::new()));
    let mut tasks = JoinSet::new();
    for client in 0..config.tasks {
        let locker = lockers[client % lockers.len()].clone();
        let (key, config) = (key.to_owned(), config.clone());
        let (inside, most_inside, over_admissions) = (
            Arc::clone(&inside),
            Arc::clone(&most_inside),
            Arc::clone(&over_admissions),
        );
        let spans = Arc::clone(&spans);
        tasks.spawn(async move {
            let (mut acquired, mut errors) = (0usize, Vec::new());
            for _ in 0..config.acquisitions_per_task {
                let asked = tokio::time::Instant::now();
                let permit = match locker
                    .semaphore(&key, permits)
                    .ttl(config.ttl)
                    .wait(config.wait)
                    .await
                {
                    Ok(permit) => permit,
                    Err(error) => {
                        errors.push(format!("client {client}: acquire: {error}"));
                        continue;
                    }
                };
                acquired += 1;
                let now_inside = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most_inside.fetch_max(now_inside, Ordering::SeqCst);
                if now_inside > permits as usize {
                    over_admissions.fetch_add(1, Ordering::SeqCst);
                }
                stay_inside(config.hold).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                let token = permit.fencing_token().get();
                if let Err(error) = permit.release().await {
                    errors.push(format!("client {client}: release: {error}"));
                }
                let released = tokio::time::Instant::now();
                spans.lock().unwrap_or_else(PoisonError::into_inner).push(Span {
                    asked,
                    released,
                    token,
                });
            }
            (acquired, errors)
        });
    }
    let mut report = SemaphoreReport {
        permits,
        ..SemaphoreReport::default()
    };
    while let Some(joined) = tasks.join_next().await {
        let (acquired, errors) =
            joined.unwrap_or_else(|error| (0, vec![format!("a checker task died: {error}")]));
        report.acquired += acquired;
        report.failed += errors.len();
        keep_first_errors(&mut report.errors, errors);
    }
    report.most_inside = most_inside.load(Ordering::SeqCst);
    report.over_admissions = over_admissions.load(Ordering::SeqCst);
    let spans = std::mem::take(&mut *spans.lock().unwrap_or_else(PoisonError::into_inner));
    let mut tokens: Vec<u64> = spans.iter().map(|span| span.token).collect();
    tokens.sort_unstable();
    report.repeated_tokens = tokens.windows(2).filter(|pair| pair[0] == pair[1]).count();
    report.tokens_out_of_order = tokens_out_of_order(spans);
    report
}
