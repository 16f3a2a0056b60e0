//! The read-write checker: many clients mixing read and write locks on one
//! key, checked for a reader inside with a writer, two writers at once and
//! fencing tokens that do not increase.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dlock_core::Locker;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::checker::{CheckerConfig, keep_first_errors, stay_inside};

/// What [`check_read_write`] saw.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ReadWriteReport {
    /// Read locks taken.
    pub reads: usize,
    /// Write locks taken.
    pub writes: usize,
    /// Acquisitions or releases that returned an error.
    pub failed: usize,
    /// The most readers seen inside at once.
    pub most_readers_inside: usize,
    /// Times a reader and a writer were inside at once.
    pub reader_writer_overlaps: usize,
    /// Times two writers were inside at once.
    pub writer_overlaps: usize,
    /// Tokens handed out twice.
    pub repeated_tokens: usize,
    /// Locks whose token was not above the token of a lock (read or
    /// write) released before they were asked for.
    pub tokens_out_of_order: usize,
    /// How long the writers waited for their lock, sorted.
    pub writer_waits: Vec<Duration>,
    /// The first few errors, as text.
    pub errors: Vec<String>,
}

impl ReadWriteReport {
    /// Panics with the report unless every acquisition worked, no reader
    /// was ever inside with a writer, no two writers were inside at once,
    /// and the tokens were unique and increasing.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(
            self.failed == 0
                && self.reader_writer_overlaps == 0
                && self.writer_overlaps == 0
                && self.repeated_tokens == 0
                && self.tokens_out_of_order == 0,
            "read-write check failed: {self:#?}"
        );
    }

    /// The `quantile` (0 to 1) of the writers' waits, if any writer got in.
    pub fn writer_wait(&self, quantile: f64) -> Option<Duration> {
        let last = self.writer_waits.len().checked_sub(1)?;
        let index = ((last as f64) * quantile.clamp(0.0, 1.0)).round() as usize;
        self.writer_waits.get(index).copied()
    }
}

/// Who is inside, counted as the clients see it.
#[derive(Default)]
struct Inside {
    readers: AtomicUsize,
    writers: AtomicUsize,
    most_readers: AtomicUsize,
    reader_writer_overlaps: AtomicUsize,
    writer_overlaps: AtomicUsize,
}

impl Inside {
    fn enter(&self, writing: bool) {
        // Each side counts itself in before it looks at the other, so of a
        // reader and a writer entering together at least one sees the other.
        if writing {
            if self.writers.fetch_add(1, Ordering::SeqCst) > 0 {
                self.writer_overlaps.fetch_add(1, Ordering::SeqCst);
            }
            if self.readers.load(Ordering::SeqCst) > 0 {
                self.reader_writer_overlaps.fetch_add(1, Ordering::SeqCst);
            }
        } else {
            let readers = self.readers.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_readers.fetch_max(readers, Ordering::SeqCst);
            if self.writers.load(Ordering::SeqCst) > 0 {
                self.reader_writer_overlaps.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn exit(&self, writing: bool) {
        let count = if writing { &self.writers } else { &self.readers };
        count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One lock's life as a client saw it (a permit's too).
pub(crate) struct Span {
    pub(crate) asked: Instant,
    pub(crate) released: Instant,
    pub(crate) token: u64,
}

/// Runs `config.tasks` tasks that each take the read-write lock `key`
/// `config.acquisitions_per_task` times, as a reader
/// (`config.read_percent` % of the time, drawn at random) or as the writer
/// (`lock(key)`), stay inside for `config.hold`, and release. A task counts
/// itself inside from the moment its lock is granted until it calls
/// release, a span within the lease, so a reader inside with a writer, or
/// two writers at once, is a real violation. Tokens must be unique, and a
/// lock asked for after another was released must carry a higher token.
///
/// ```
/// use dlock_core::Locker;
/// use dlock_testkit::{CheckerConfig, MemoryBackend, check_read_write};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let backend = MemoryBackend::new();
/// let lockers: Vec<Locker> = (0..4).map(|_| Locker::new(backend.clone())).collect();
/// let config = CheckerConfig::default().load(8, 25).hold(std::time::Duration::from_millis(1));
/// let report = check_read_write(&lockers, "checker/rw-doc", config).await;
/// report.assert_clean();
/// assert_eq!(report.reads + report.writes, 200);
/// # }
/// ```
pub async fn check_read_write(lockers: &[Locker], key: &str, config: CheckerConfig) -> ReadWriteReport {
    assert!(!lockers.is_empty(), "check_read_write needs at least one locker");
    let inside = Arc::new(Inside::default());
    let spans = Arc::new(Mutex::new(Vec::<Span>::new()));
    let writer_waits = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let mut tasks = JoinSet::new();
    for client in 0..config.tasks {
        let locker = lockers[client % lockers.len()].clone();
        let (key, config) = (key.to_owned(), config.clone());
        let (inside, spans, writer_waits) =
            (Arc::clone(&inside), Arc::clone(&spans), Arc::clone(&writer_waits));
        tasks.spawn(async move {
            let (mut reads, mut writes, mut errors) = (0usize, 0usize, Vec::new());
            for _ in 0..config.acquisitions_per_task {
                let writing = fastrand::u8(..100) >= config.read_percent;
                let asked = Instant::now();
                let request = if writing {
                    locker.lock(&key)
                } else {
                    locker.read_lock(&key)
                };
                let guard = match request.ttl(config.ttl).wait(config.wait).await {
                    Ok(guard) => guard,
                    Err(error) => {
                        errors.push(format!("client {client}: acquire: {error}"));
                        continue;
                    }
                };
                if writing {
                    writes += 1;
                    writer_waits
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(asked.elapsed());
                } else {
                    reads += 1;
                }
                inside.enter(writing);
                stay_inside(config.hold).await;
                inside.exit(writing);
                let token = guard.fencing_token().get();
                if let Err(error) = guard.release().await {
                    errors.push(format!("client {client}: release: {error}"));
                }
                let released = Instant::now();
                spans.lock().unwrap_or_else(PoisonError::into_inner).push(Span {
                    asked,
                    released,
                    token,
                });
            }
            (reads, writes, errors)
        });
    }
    let mut report = ReadWriteReport::default();
    while let Some(joined) = tasks.join_next().await {
        let (reads, writes, errors) =
            joined.unwrap_or_else(|error| (0, 0, vec![format!("a checker task died: {error}")]));
        report.reads += reads;
        report.writes += writes;
        report.failed += errors.len();
        keep_first_errors(&mut report.errors, errors);
    }
    report.most_readers_inside = inside.most_readers.load(Ordering::SeqCst);
    report.reader_writer_overlaps = inside.reader_writer_overlaps.load(Ordering::SeqCst);
    report.writer_overlaps = inside.writer_overlaps.load(Ordering::SeqCst);
    report.writer_waits = std::mem::take(&mut *writer_waits.lock().unwrap_or_else(PoisonError::into_inner));
    report.writer_waits.sort_unstable();
    let spans = std::mem::take(&mut *spans.lock().unwrap_or_else(PoisonError::into_inner));
    let mut tokens: Vec<u64> = spans.iter().map(|span| span.token).collect();
    tokens.sort_unstable();
    report.repeated_tokens = tokens.windows(2).filter(|pair| pair[0] == pair[1]).count();
    report.tokens_out_of_order = tokens_out_of_order(spans);
    report
}

/// How many spans carry a token not above the highest token among the
/// spans released before they were asked for.
pub(crate) fn tokens_out_of_order(mut spans: Vec<Span>) -> usize {
    spans.sort_by_key(|span| span.asked);
    let mut by_release: Vec<(Instant, u64)> = spans.iter().map(|span| (span.released, span.token)).collect();
    by_release.sort_unstable();
    let (mut next_release, mut highest_released, mut out_of_order) = (0, 0u64, 0);
    for span in &spans {
        while next_release < by_release.len() && by_release[next_release].0 < span.asked {
            highest_released = highest_released.max(by_release[next_release].1);
            next_release += 1;
        }
        if span.token <= highest_released {
            out_of_order += 1;
        }
    }
    out_of_order
}
