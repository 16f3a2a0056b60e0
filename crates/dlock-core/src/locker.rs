//! The entry point: `Locker`, which hands out `LockRequest`s (request.rs).

use std::fmt;
use std::sync::Arc;

use crate::backend::{LockBackend, LockKind};
use crate::background::Background;
use crate::election::Election;
use crate::error::LockError;
use crate::guard::LockGuard;
use crate::options::{DEFAULT_TTL, validate_key};
use crate::reads::HeldReads;
use crate::renewals::RenewalsByRuntime;
use crate::request::LockRequest;
use crate::status::KeyStatus;
use crate::telemetry::Meters;

/// Hands out locks from one backend.
///
/// Cheap to clone (an `Arc` inside); clones share the backend and its
/// connections. Needs a Tokio runtime: guards renew their leases in tasks.
///
/// ```
/// use std::time::Duration;
/// use dlock_core::{LockError, Locker};
/// use dlock_testkit::MemoryBackend;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), LockError> {
/// let locker = Locker::new(MemoryBackend::new());
///
/// let guard = locker
///     .lock("orders/42")
///     .ttl(Duration::from_secs(10))
///     .wait(Duration::from_secs(5))
///     .await?;
///
/// // A second attempt while the lock is held is refused at once.
/// let second = locker.try_lock("orders/42").await;
/// assert!(matches!(second, Err(LockError::Contended { .. })));
///
/// guard.release().await?;
///
/// // `with_lock` acquires, runs the closure, and releases.
/// let total = locker.with_lock("orders/42", async |guard| guard.fencing_token().get() * 10).await?;
/// assert_eq!(total, 20);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Locker {
    backend: Arc<dyn LockBackend>,
    renewals: Arc<RenewalsByRuntime>,
    background: Arc<Background>,
    held_reads: Arc<HeldReads>,
    meters: Meters,
}

impl Locker {
    /// A locker over `backend`.
    pub fn new(backend: impl LockBackend) -> Self {
        Locker::from_arc(Arc::new(backend))
    }

    /// A locker over a backend that is already shared.
    pub fn from_arc(backend: Arc<dyn LockBackend>) -> Self {
        let meters = Meters::new(backend.name());
        Locker {
            backend,
            renewals: Arc::default(),
            background: Arc::default(),
            held_reads: Arc::default(),
            meters,
        }
    }

    /// Whether this locker's metrics (feature `metrics`) carry the label
    /// `key` with each lock's key (default false). Turn it on only for a
    /// bounded set of keys: every key becomes series of its own in the
    /// metrics store. [`LockRequest::metrics_name`] names one request's
    /// series instead.
    ///
    /// ```
    /// use dlock_core::Locker;
    /// use dlock_testkit::MemoryBackend;
    ///
    /// let locker = Locker::new(MemoryBackend::new()).metrics_key_label(true);
    /// # drop(locker);
    /// ```
    pub fn metrics_key_label(mut self, on: bool) -> Self {
        self.meters.key_label = on;
        self
    }

    /// Waits until the clean-up this locker left to background tasks has
    /// finished: the release of a guard that was dropped, and the clean-up
    /// after a request that was cancelled or failed (a lock its last
    /// attempt may have taken, a place in a queue).
    ///
    /// Call it before the process exits: a Tokio runtime that shuts down
    /// drops those tasks, and what they were giving back then stays until
    /// its TTL runs out. A clean-up retries while the backend is
    /// unavailable (for at most the request's TTL), so bound the wait:
    ///
    /// ```
    /// use std::time::Duration;
    /// use dlock_core::Locker;
    /// use dlock_testkit::MemoryBackend;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let locker = Locker::new(MemoryBackend::new());
    /// drop(locker.try_lock("jobs/nightly").await); // released in the background
    /// let _ = tokio::time::timeout(Duration::from_secs(5), locker.wait_for_cleanup()).await;
    /// # }
    /// ```
    pub async fn wait_for_cleanup(&self) {
        self.background.idle().await;
    }

    /// For operators: whether `key` is held, for how long, its last fencing
    /// token and how many wait, as far as the backend knows (never the
    /// holder's secret). [`LockError::Unsupported`] from a backend without
    /// operator views.
    ///
    /// ```
    /// use dlock_core::Locker;
    /// use dlock_testkit::MemoryBackend;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dlock_core::LockError> {
    /// let locker = Locker::new(MemoryBackend::new());
    /// let guard = locker.try_lock("reports/daily").await?;
    /// let status = locker.inspect("reports/daily").await?;
    /// assert!(status.held);
    /// assert_eq!(status.last_token, Some(guard.fencing_token().get()));
    /// # Ok(()) }
    /// ```
    pub async fn inspect(&self, key: &str) -> Result<KeyStatus, LockError> {
        validate_key(key)?;
        self.backend.inspect(key).await
    }

    /// For operators, and unsafe: ends the lock on `key` whoever holds it,
    /// and lets the next waiter in. The holder learns it at its next
    /// renewal at the latest, and may still be writing until then: only
    /// fencing tokens protect the resource from it. Returns whether the key
    /// was held.
    pub async fn force_release(&self, key: &str) -> Result<bool, LockError> {
        validate_key(key)?;
        self.backend.force_release(key).await
    }

    /// The backend behind this locker.
    pub fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.backend
    }

    /// Starts a request for `key`; set options on it, then `.await` it.
    ///
    /// Defaults: TTL 30 s, wait without limit, auto-renewal on.
    ///
    /// This is also the writer of the read-write lock `key`
    /// ([`read_lock`](Self::read_lock)): it waits until every reader has
    /// left, and readers that come while it waits queue behind it.
    pub fn lock(&self, key: impl Into<String>) -> LockRequest {
        LockRequest {
            backend: Arc::clone(&self.backend),
            renewals: Arc::clone(&self.renewals),
            background: Arc::clone(&self.background),
            held_reads: Arc::clone(&self.held_reads),
            key: key.into(),
            ttl: DEFAULT_TTL,
            wait: None,
            auto_renew: true,
            kind: LockKind::Exclusive,
            value: None,
            meters: self.meters.clone(),
            metrics_name: None,
        }
    }

    /// A request for a read lock on `key`: any number of readers hold the
    /// key together while no writer does; the writer is
    /// [`lock(key)`](Self::lock). Each reader is a lease of its own, with
    /// its owner token, TTL, renewal, loss signal and a fencing token
    /// greater than every token before it on the key (readers' and
    /// writers'): a crashed reader keeps writers out until its own TTL
    /// ends, never longer. The request builds like [`lock`](Self::lock).
    ///
    /// Writers are never starved: once a writer waits, readers that come
    /// after it queue behind it, and when it releases, the readers waiting
    /// behind it are admitted together.
    ///
    /// There is no upgrade: a task that holds a read lock and awaits
    /// `lock(key)` with no wait limit would wait for itself forever, and
    /// gets [`LockError::UpgradeRefused`] at once instead (with a wait
    /// limit it times out; [`try_lock`](LockRequest::try_lock) answers
    /// [`LockError::Contended`]). Release the read lock, then take the
    /// write lock and check again what you read, or take the write lock
    /// from the start. A semaphore's key is [`LockError::WrongKind`].
    ///
    /// ```
    /// # use dlock_core::{LockError, Locker};
    /// # use dlock_testkit::MemoryBackend;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), LockError> {
    /// let locker = Locker::new(MemoryBackend::new());
    /// let first = locker.read_lock("catalog").await?;
    /// let second = locker.read_lock("catalog").await?; // readers share
    /// assert!(second.fencing_token() > first.fencing_token());
    /// // The writer is kept out while they read...
    /// assert!(matches!(locker.try_lock("catalog").await, Err(LockError::Contended { .. })));
    /// // ...and an upgrade is refused rather than waiting for itself.
    /// assert!(matches!(locker.lock("catalog").await, Err(LockError::UpgradeRefused { .. })));
    /// first.release().await?;
    /// second.release().await?;
    /// let writer = locker.try_lock("catalog").await?;
    /// # drop(writer); Ok(()) }
    /// ```
    pub fn read_lock(&self, key: impl Into<String>) -> LockRequest {
        LockRequest {
            kind: LockKind::Shared,
            ..self.lock(key)
        }
    }

    /// A request for one permit of the counting semaphore `key`: at most
    /// `permits` holders at once, each with a lease of its own (its owner
    /// token, TTL, renewal, loss signal and a fencing token greater than
    /// every token before it on the key). A crashed holder frees its permit
    /// when its TTL ends, never anyone else's.
    ///
    /// The limit is stored with the key: asking with another limit while
    /// permits are held is [`LockError::InvalidOptions`] naming both; a key
    /// in use as a mutex is [`LockError::WrongKind`], and so is a mutex on
    /// a semaphore's key. `permits` must be 1 to
    /// [`MAX_PERMITS`](crate::MAX_PERMITS). The request builds like
    /// [`lock`](Self::lock): `.ttl()`, `.wait()`, `.auto_renew()`,
    /// `.try_lock()` ([`LockError::Contended`] when every permit is taken),
    /// `.with_lock()`; on backends that keep a line, waiters get released
    /// permits in arrival order.
    ///
    /// ```
    /// # use dlock_core::{LockError, Locker};
    /// # use dlock_testkit::MemoryBackend;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), LockError> {
    /// let locker = Locker::new(MemoryBackend::new());
    /// let first = locker.semaphore("crawlers", 2).await?;
    /// let second = locker.semaphore("crawlers", 2).await?;
    /// assert!(second.fencing_token() > first.fencing_token());
    /// // Both permits are taken.
    /// assert!(matches!(
    ///     locker.semaphore("crawlers", 2).try_lock().await,
    ///     Err(LockError::Contended { .. })
    /// ));
    /// first.release().await?;
    /// let third = locker.semaphore("crawlers", 2).try_lock().await?;
    /// # drop((second, third)); Ok(()) }
    /// ```
    pub fn semaphore(&self, key: impl Into<String>, permits: u32) -> LockRequest {
        LockRequest {
            kind: LockKind::Semaphore { permits },
            ..self.lock(key)
        }
    }

    /// The leader election `key`: campaign in it, read or observe its
    /// leader; see [`Election`].
    ///
    /// ```
    /// # use dlock_core::{LockError, Locker};
    /// # use dlock_testkit::MemoryBackend;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), LockError> {
    /// let locker = Locker::new(MemoryBackend::new());
    /// let leadership = locker.election("scheduler").campaign("node-a:8080").await?;
    /// // Another candidate does not lead while this one does.
    /// let second = locker.election("scheduler").campaign("node-b:8080").try_campaign().await;
    /// assert!(matches!(second, Err(LockError::Contended { .. })));
    /// # drop(leadership); Ok(()) }
    /// ```
    pub fn election(&self, key: impl Into<String>) -> Election {
        Election::new(self.clone(), key.into())
    }

    /// One attempt with default options: the lock, or
    /// [`LockError::Contended`] at once.
    pub async fn try_lock(&self, key: impl Into<String>) -> Result<LockGuard, LockError> {
        self.lock(key).try_lock().await
    }

    /// Acquires `key` with default options, runs `critical_section` while
    /// holding it, and releases it; see [`LockRequest::with_lock`].
    pub async fn with_lock<F, T>(&self, key: impl Into<String>, critical_section: F) -> Result<T, LockError>
    where
        F: AsyncFnOnce(&LockGuard) -> T,
    {
        self.lock(key).with_lock(critical_section).await
    }
}

impl fmt::Debug for Locker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Locker").finish_non_exhaustive()
    }
}
