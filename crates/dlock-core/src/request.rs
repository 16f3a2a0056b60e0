//! `LockRequest`: the request builder every kind of lock shares, and the
//! wait loop that runs when it is awaited.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep, sleep_until};
use tracing::{Instrument, Span, debug, field, info_span, warn};

use crate::backend::{AcquireRequest, Attempt, LockBackend, LockKind};
use crate::background::Background;
use crate::backoff::{Backoff, small_jitter};
use crate::error::LockError;
use crate::guard::{Acquired, LockGuard};
use crate::notify::ReleaseEvents;
use crate::options::{validate_key, validate_permits, validate_ttl, validate_wait};
use crate::owner::OwnerToken;
use crate::reads::HeldReads;
use crate::renewals::RenewalsByRuntime;
use crate::telemetry::{AcquireOutcome, Meter, Meters, Operation, WaitingMark, kind_label};

/// Whether a request found the lock taken, and its place among the
/// waiting requests while it waits.
#[derive(Default)]
struct Contention {
    busy: bool,
    waiting: Option<WaitingMark>,
}

/// A lock request being built; `.await` it to wait for the lock.
///
/// The future is cancel-safe: dropping it while it waits (for instance under
/// `tokio::time::timeout`) leaves no lock and no queue entry behind; the
/// clean-up runs in a spawned task.
#[must_use = "a LockRequest does nothing until it is awaited"]
pub struct LockRequest {
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) renewals: Arc<RenewalsByRuntime>,
    pub(crate) background: Arc<Background>,
    pub(crate) held_reads: Arc<HeldReads>,
    pub(crate) key: String,
    pub(crate) ttl: Duration,
    pub(crate) wait: Option<Duration>,
    pub(crate) auto_renew: bool,
    pub(crate) kind: LockKind,
    /// An election candidate's value (see `election.rs`).
    pub(crate) value: Option<String>,
    pub(crate) meters: Meters,
    /// The `key` label of this request's metrics, if the user named it.
    pub(crate) metrics_name: Option<String>,
}

impl LockRequest {
    /// Lease length (default 30 s, allowed [`MIN_TTL`](crate::MIN_TTL) to
    /// [`MAX_TTL`](crate::MAX_TTL)). With auto-renewal this bounds how long
    /// the lock outlives a crashed holder; without it, how long it is held.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Gives up with [`LockError::Timeout`] after waiting this long (default:
    /// wait until acquired; zero is refused, use [`try_lock`](Self::try_lock)).
    ///
    /// Within this limit, a backend that is briefly unavailable (a server
    /// restart, a failover) is tried again with backoff; if it is still
    /// unavailable when the limit runs out, that
    /// [`LockError::Unavailable`] is returned. Without a limit, the first
    /// backend error ends the request, so a server that is down never makes
    /// `lock()` hang.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = Some(wait);
        self
    }

    /// Whether the guard renews the lease every `ttl / 3` (default true).
    /// Without renewal the guard turns lost when the TTL runs out.
    pub fn auto_renew(mut self, auto_renew: bool) -> Self {
        self.auto_renew = auto_renew;
        self
    }

    /// Labels this request's metrics (feature `metrics`) and its guard's
    /// with `key` = `name`, whatever the locker's
    /// [`metrics_key_label`](crate::Locker::metrics_key_label) says. Use
    /// one name for a family of keys ("orders") to see them apart from the
    /// rest without a series per key.
    ///
    /// ```
    /// use dlock_core::Locker;
    /// use dlock_testkit::MemoryBackend;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dlock_core::LockError> {
    /// let locker = Locker::new(MemoryBackend::new());
    /// let guard = locker.lock("orders/42").metrics_name("orders").await?;
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn metrics_name(mut self, name: impl Into<String>) -> Self {
        self.metrics_name = Some(name.into());
        self
    }

    /// One attempt with these options: the lock, or
    /// [`LockError::Contended`] at once.
    pub async fn try_lock(self) -> Result<LockGuard, LockError> {
        self.acquire(false).await
    }

    /// Acquires the lock, runs `critical_section` while holding it, and
    /// releases it.
    ///
    /// If the lock is lost before the closure finishes, the closure's future
    /// is dropped at its next `.await` and [`LockError::Lost`] is returned.
    /// `Ok` means the closure ran to its end while the lock was held; a
    /// release that fails afterwards is only logged, since the lease then
    /// runs out by its TTL.
    pub async fn with_lock<F, T>(self, critical_section: F) -> Result<T, LockError>
    where
        F: AsyncFnOnce(&LockGuard) -> T,
    {
        let guard = self.await?;
        let outcome = {
            let work = critical_section(&guard);
            tokio::select! {
                biased;
                () = guard.lost() => None,
                value = work => Some(value),
            }
        };
        let Some(value) = outcome else {
            let error = LockError::Lost {
                key: guard.key().to_owned(),
                token: guard.fencing_token(),
            };
            guard.forget();
            return Err(error);
        };
        if !guard.is_held() {
            let error = LockError::Lost {
                key: guard.key().to_owned(),
                token: guard.fencing_token(),
            };
            guard.forget();
            return Err(error);
        }
        if let Err(error) = guard.release().await {
            warn!(%error, "release after the critical section failed; the lease runs out by its TTL");
        }
        Ok(value)
    }

    async fn acquire(self, waiting: bool) -> Result<LockGuard, LockError> {
        validate_key(&self.key)?;
        validate_ttl(&self.key, self.ttl)?;
        if let LockKind::Semaphore { permits } = self.kind {
            validate_permits(&self.key, permits)?;
        }
        if let Some(wait) = self.wait {
            if waiting {
                validate_wait(&self.key, wait)?;
            }
        }
        if waiting
            && self.wait.is_none()
            && self.kind == LockKind::Exclusive
            && self.held_reads.held_here(&self.key)
        {
            return Err(LockError::UpgradeRefused { key: self.key });
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(LockError::unsupported(
                Some(&self.key),
                "locking outside a Tokio runtime",
            ));
        }
        let owner = OwnerToken::generate()?;
        let span = info_span!(
            "dlock.acquire",
            key = %self.key,
            kind = kind_label(self.kind),
            backend = self.meters.backend,
            ttl_ms = self.ttl.as_millis() as u64,
            wait = waiting,
            token = field::Empty,
            outcome = field::Empty,
        );
        self.acquire_as(owner, waiting).instrument(span).await
    }

    /// Runs the request and records how it ended (metrics, and the span's
    /// `outcome`).
    async fn acquire_as(self, owner: OwnerToken, waiting: bool) -> Result<LockGuard, LockError> {
        let meter = self
            .meters
            .meter(self.kind, &self.key, self.metrics_name.as_deref());
        let began = Instant::now();
        let mut contention = Contention::default();
        let result = self
            .wait_loop(owner, waiting, began, &meter, &mut contention)
            .await;
        let outcome = match &result {
            Ok(_) => AcquireOutcome::Acquired,
            Err(LockError::Contended { .. }) => AcquireOutcome::Contended,
            Err(LockError::Timeout { .. }) => AcquireOutcome::Timeout,
            Err(_) => AcquireOutcome::Error,
        };
        Span::current().record("outcome", outcome.as_str());
        let elapsed = began.elapsed();
        meter.request_ended(outcome, elapsed, contention.waiting.is_some());
        result
    }

    async fn wait_loop(
        self,
        owner: OwnerToken,
        waiting: bool,
        began: Instant,
        meter: &Meter,
        contention: &mut Contention,
    ) -> Result<LockGuard, LockError> {
        let LockRequest {
            backend,
            renewals,
            background,
            held_reads,
            key,
            ttl,
            wait,
            auto_renew,
            kind,
            value,
            ..
        } = self;
        let deadline = wait.filter(|_| waiting).map(|wait| began + wait);
        // Owns the key and owner token until a guard takes them over.
        let mut pending = PendingAcquisition {
            backend: Arc::clone(&backend),
            background: Arc::clone(&background),
            key,
            owner,
            ttl,
            armed: true,
        };
        let mut subscription: Option<ReleaseEvents> = None;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let started = Instant::now();
            let request = AcquireRequest::new(
                &pending.key,
                &pending.owner,
                ttl,
                auto_renew,
                waiting,
                kind,
                value.as_deref(),
            );
            // On error the outcome on the server is unknown; `pending` stays
            // armed and cleans up in the background.
            let answer = backend.try_acquire(&request).await;
            let attempt = match meter.backend_answer(answer, Operation::Acquire) {
                Ok(attempt) => attempt,
                Err(error) => {
                    ride_out(error, deadline, &mut backoff).await?;
                    continue;
                }
            };
            let busy = match attempt {
                Attempt::Acquired(grant) if started + grant.validity <= Instant::now() => {
                    // The answer came after the lease it granted was over
                    // (a slow server, a slow quorum): another client may
                    // hold the key already. Not acquired; `pending` gives
                    // the key back if this request ends here, and a retry
                    // by the same owner is granted afresh.
                    let error = LockError::unavailable(
                        Some(&pending.key),
                        format!(
                            "the backend granted the lock {:?} after the request began, when its lease ({ttl:?}) was no longer certain to last",
                            started.elapsed()
                        ),
                    );
                    ride_out(error, deadline, &mut backoff).await?;
                    continue;
                }
                Attempt::Acquired(grant) => {
                    let (key, owner) = pending.disarm();
                    Span::current().record("token", grant.token.get());
                    debug!(waited_ms = began.elapsed().as_millis() as u64, "acquired");
                    let reading = (kind == LockKind::Shared).then(|| held_reads.record(&key));
                    return Ok(LockGuard::start(Acquired {
                        backend,
                        key,
                        owner,
                        ttl,
                        auto_renew,
                        kind,
                        started,
                        grant,
                        renewals: renewals.for_current_runtime(),
                        background,
                        reading,
                        meter: meter.clone(),
                    }));
                }
                Attempt::Busy(busy) => busy,
            };
            if !contention.busy {
                contention.busy = true;
                meter.contended();
                if waiting {
                    contention.waiting = Some(meter.waiting());
                }
            }
            if !waiting {
                // A single attempt leaves nothing behind when busy.
                let (key, _) = pending.disarm();
                return Err(LockError::Contended { key });
            }
            let now = Instant::now();
            if deadline.is_some_and(|deadline| now >= deadline) {
                return Err(LockError::Timeout {
                    key: pending.key.clone(),
                    waited: now - began,
                });
            }
            if let Some(pause) = busy.hold_off {
                let resume_at = deadline.map_or(now + pause, |deadline| deadline.min(now + pause));
                sleep_until(resume_at).await;
                continue;
            }
            let mut own_wake = busy.wake;
            if own_wake.is_none() && subscription.is_none() {
                match backend.subscribe(&pending.key).await {
                    Ok(events) => subscription = Some(events),
                    Err(error) => ride_out(error, deadline, &mut backoff).await?,
                }
                // Try again at once: a release between the attempt above and
                // the subscription would otherwise go unnoticed.
                continue;
            }
            let fallback = match busy.retry_after {
                Some(remaining) => remaining + small_jitter(remaining),
                None => backoff.next_delay(),
            };
            let mut wake_at = now + fallback;
            if let Some(deadline) = deadline {
                wake_at = wake_at.min(deadline);
            }
            let events = match own_wake.as_mut() {
                Some(events) => Some(events),
                None => subscription.as_mut(),
            };
            wait_for_wake(events, wake_at).await;
        }
    }
}

/// Decides what a backend error does to a waiting request: with a wait
/// limit, an unavailable backend (a restart, a failover) is tried again
/// after a backoff pause while the limit allows, and the error is returned
/// once it does not; anything else, or no limit (which would wait forever
/// on a server that is down), ends the request with the error.
async fn ride_out(
    error: LockError,
    deadline: Option<Instant>,
    backoff: &mut Backoff,
) -> Result<(), LockError> {
    let Some(deadline) = deadline else {
        return Err(error);
    };
    if !matches!(error, LockError::Unavailable { .. }) {
        return Err(error);
    }
    let resume_at = Instant::now() + backoff.next_delay();
    if resume_at >= deadline {
        return Err(error);
    }
    debug!(%error, "backend unavailable while waiting; trying again");
    sleep_until(resume_at).await;
    Ok(())
}

/// Sleeps until a release notification or `wake_at`, whichever comes first.
async fn wait_for_wake(events: Option<&mut ReleaseEvents>, wake_at: Instant) {
    let Some(events) = events else {
        sleep_until(wake_at).await;
        return;
    };
    tokio::select! {
        notified = events.recv() => {
            if !notified {
                // The source closed: no more notifications, only the timer.
                *events = ReleaseEvents::never();
                sleep_until(wake_at).await;
            }
        }
        () = sleep_until(wake_at) => {}
    }
}

impl IntoFuture for LockRequest {
    type Output = Result<LockGuard, LockError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.acquire(true))
    }
}

impl fmt::Debug for LockRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockRequest")
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .field("wait", &self.wait)
            .field("auto_renew", &self.auto_renew)
            .finish()
    }
}

/// Cleans up after an acquisition that did not end with a guard: a request
/// cancelled while an attempt was in flight may have taken the lock, and a
/// waiting request may hold a queue place.
struct PendingAcquisition {
    backend: Arc<dyn LockBackend>,
    background: Arc<Background>,
    key: String,
    owner: OwnerToken,
    /// The lease length asked for: past it, nothing is left to clean up.
    ttl: Duration,
    armed: bool,
}

impl PendingAcquisition {
    /// Nothing is left to clean up: hands back the key and owner token.
    fn disarm(&mut self) -> (String, OwnerToken) {
        self.armed = false;
        (std::mem::take(&mut self.key), self.owner.clone())
    }
}

impl Drop for PendingAcquisition {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let backend = Arc::clone(&self.backend);
        let key = std::mem::take(&mut self.key);
        let owner = self.owner.clone();
        let give_up_at = Instant::now() + self.ttl;
        self.background.spawn(&runtime, async move {
            // The failure that ended the request (a broken connection, a
            // failover) often ends the first clean-up too; try again while
            // a lease we may have taken could still be alive.
            let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
            loop {
                match backend.abandon(&key, &owner).await {
                    Ok(()) => return,
                    Err(error @ LockError::Unavailable { .. }) if Instant::now() < give_up_at => {
                        debug!(%key, %error, "clean-up after a failed or cancelled request; retrying");
                        sleep(backoff.next_delay()).await;
                    }
                    Err(error) => {
                        debug!(%key, %error, "clean-up after a cancelled request failed; its lease runs out by its TTL");
                        return;
                    }
                }
            }
        });
    }
}
