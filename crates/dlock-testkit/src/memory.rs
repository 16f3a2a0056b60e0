//! `MemoryBackend`: the whole lock protocol in process memory, on Tokio's clock.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use dlock_core::backend::{
    AcquireRequest, Attempt, Busy, ExtendOutcome, Grant, Lease, LockBackend, OwnerToken, ReleaseEvents,
    ReleaseHub, ReleaseOutcome,
};
use dlock_core::{FencingToken, KeyStatus, LockError, NotHeldReason, drift_allowance};
use tokio::time::{Instant, sleep};

/// An in-memory lock backend for tests, with virtual time and scripted faults.
///
/// It keeps the same contract as the network backends: owner-checked
/// operations, a fencing counter per key, release notifications, TTLs. Time
/// is read from [`tokio::time::Instant`], so under a paused clock
/// (`#[tokio::test(start_paused = true)]`) a 30-second TTL runs out in
/// microseconds of real time.
///
/// Clones share state, like several clients of one server: give each
/// simulated process its own [`Locker`](dlock_core::Locker) over a clone.
///
/// Faults a test can script: [`fail_next`](Self::fail_next) (the next N
/// operations fail as unavailable), [`set_unavailable`](Self::set_unavailable),
/// [`set_latency`](Self::set_latency), and [`force_expire`](Self::force_expire)
/// (a lease ends as if its holder had paused past its TTL).
///
/// # Testing your code against lock loss
///
/// ```
/// use std::time::Duration;
/// use dlock_core::{LockError, Locker};
/// use dlock_testkit::MemoryBackend;
///
/// // The code under test: a job that stops when its lock is lost.
/// async fn nightly_job(locker: &Locker) -> Result<u32, LockError> {
///     locker
///         .with_lock("jobs/nightly", async |_guard| {
///             let mut batches = 0;
///             loop {
///                 tokio::time::sleep(Duration::from_secs(1)).await; // one batch of work
///                 batches += 1;
///             }
///             #[allow(unreachable_code)]
///             batches
///         })
///         .await
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// // start_paused: virtual time, so the test below takes milliseconds.
/// let backend = MemoryBackend::new();
/// let locker = Locker::new(backend.clone());
/// let job = tokio::spawn(async move { nightly_job(&locker).await });
///
/// tokio::time::sleep(Duration::from_secs(60)).await; // the job runs for a while
/// backend.force_expire("jobs/nightly"); // its lease ends behind its back
///
/// // The next renewal finds the lease gone: the job is stopped and told.
/// let outcome = job.await.unwrap();
/// assert!(matches!(outcome, Err(LockError::Lost { .. })));
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryBackend {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    hub: ReleaseHub,
}

#[derive(Default)]
struct State {
    holders: HashMap<String, Holder>,
    fences: HashMap<String, u64>,
    faults: Faults,
    operations: u64,
}

struct Holder {
    owner: String,
    expires_at: Instant,
    token: u64,
}

#[derive(Default)]
struct Faults {
    fail_next: u64,
    unavailable: bool,
    latency: Duration,
}

impl MemoryBackend {
    /// An empty backend: no locks, all fencing counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the lease on `key` now, as if its holder had paused past its
    /// TTL, and wakes the key's waiters. The holder finds out at its next
    /// renewal (within `ttl / 3`), like on a real server. Returns whether a
    /// live lease was ended.
    pub fn force_expire(&self, key: &str) -> bool {
        let ended = {
            let mut state = self.state();
            let now = Instant::now();
            match state.holders.remove(key) {
                Some(holder) => holder.expires_at > now,
                None => false,
            }
        };
        self.inner.hub.notify(key);
        ended
    }

    /// Makes the next `operations` calls (acquire, extend, release, abandon,
    /// subscribe) fail with [`LockError::Unavailable`].
    pub fn fail_next(&self, operations: u64) {
        self.state().faults.fail_next = operations;
    }

    /// Makes every call fail with [`LockError::Unavailable`] until called
    /// again with `false`. Leases keep running out meanwhile.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state().faults.unavailable = unavailable;
    }

    /// Delays every call by `latency` (on Tokio's clock) before it takes effect.
    pub fn set_latency(&self, latency: Duration) {
        self.state().faults.latency = latency;
    }

    /// Whether a live lease is held on `key`.
    pub fn is_locked(&self, key: &str) -> bool {
        let now = Instant::now();
        self.state()
            .holders
            .get(key)
            .is_some_and(|holder| holder.expires_at > now)
    }

    /// The fencing token of the live lease on `key`, if any.
    pub fn holder_token(&self, key: &str) -> Option<FencingToken> {
        let now = Instant::now();
        self.state()
            .holders
            .get(key)
            .filter(|holder| holder.expires_at > now)
            .map(|holder| FencingToken::new(holder.token))
    }

    /// Number of live leases on all keys.
    pub fn held_count(&self) -> usize {
        let now = Instant::now();
        self.state()
            .holders
            .values()
            .filter(|holder| holder.expires_at > now)
            .count()
    }

    /// Number of keys that have at least one waiter listening for releases.
    pub fn subscribed_keys(&self) -> usize {
        self.inner.hub.len()
    }

    /// Number of calls the backend has answered (failed ones included).
    pub fn operations(&self) -> u64 {
        self.state().operations
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update below leaves the maps consistent, so a panic elsewhere
        // while the lock was held does not poison the data.
        self.inner.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies latency and scripted faults; every operation starts here.
    async fn enter(&self, key: &str) -> Result<(), LockError> {
        let latency = self.state().faults.latency;
        if !latency.is_zero() {
            sleep(latency).await;
        }
        let mut state = self.state();
        state.operations += 1;
        let faults = &mut state.faults;
        if faults.unavailable {
            return Err(LockError::unavailable(
                Some(key),
                "the in-memory backend is set unavailable (set_unavailable)",
            ));
        }
        if faults.fail_next > 0 {
            faults.fail_next -= 1;
            return Err(LockError::unavailable(
                Some(key),
                "the in-memory backend was told to fail this operation (fail_next)",
            ));
        }
        Ok(())
    }
}

impl State {
    /// The live holder of `key`; an expired one is removed first.
    fn live_holder(&mut self, key: &str, now: Instant) -> Option<&mut Holder> {
        if self
            .holders
            .get(key)
            .is_some_and(|holder| holder.expires_at <= now)
        {
            self.holders.remove(key);
        }
        self.holders.get_mut(key)
    }

    fn check_owner(
        &mut self,
        key: &str,
        owner: &OwnerToken,
        now: Instant,
    ) -> Result<&mut Holder, NotHeldReason> {
        match self.live_holder(key, now) {
            Some(holder) if holder.owner == owner.as_str() => Ok(holder),
            Some(_) => Err(NotHeldReason::OtherOwner),
            None => Err(NotHeldReason::Expired),
        }
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt, LockError> {
        request.require_exclusive()?;
        self.enter(request.key).await?;
        let now = Instant::now();
        let mut state = self.state();
        let validity = request.ttl.saturating_sub(drift_allowance(request.ttl));
        if let Some(holder) = state.live_holder(request.key, now) {
            if holder.owner != request.owner.as_str() {
                let remaining = holder.expires_at - now;
                return Ok(Attempt::Busy(Busy::new().retry_after(remaining)));
            }
            // A retried request of the same owner: same lease, same token.
            holder.expires_at = now + request.ttl;
            let token = FencingToken::new(holder.token);
            return Ok(Attempt::Acquired(Grant::new(token, validity)));
        }
        let fence = state.fences.entry(request.key.to_owned()).or_insert(0);
        *fence += 1;
        let token = *fence;
        state.holders.insert(
            request.key.to_owned(),
            Holder {
                owner: request.owner.as_str().to_owned(),
                expires_at: now + request.ttl,
                token,
            },
        );
        Ok(Attempt::Acquired(Grant::new(FencingToken::new(token), validity)))
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<ExtendOutcome, LockError> {
        self.enter(lease.key()).await?;
        let now = Instant::now();
        let mut state = self.state();
        Ok(match state.check_owner(lease.key(), lease.owner(), now) {
            Ok(holder) => {
                holder.expires_at = now + ttl;
                ExtendOutcome::Extended {
                    validity: ttl.saturating_sub(drift_allowance(ttl)),
                }
            }
            Err(reason) => ExtendOutcome::NotHeld(reason),
        })
    }

    async fn release(&self, lease: &Lease) -> Result<ReleaseOutcome, LockError> {
        self.enter(lease.key()).await?;
        let now = Instant::now();
        let outcome = {
            let mut state = self.state();
            match state.check_owner(lease.key(), lease.owner(), now) {
                Ok(_) => {
                    state.holders.remove(lease.key());
                    ReleaseOutcome::Released
                }
                Err(reason) => ReleaseOutcome::NotHeld(reason),
            }
        };
        if outcome == ReleaseOutcome::Released {
            self.inner.hub.notify(lease.key());
        }
        Ok(outcome)
    }

    async fn abandon(&self, key: &str, owner: &OwnerToken) -> Result<(), LockError> {
        self.enter(key).await?;
        let now = Instant::now();
        let removed = {
            let mut state = self.state();
            let ours = state.check_owner(key, owner, now).is_ok();
            if ours {
                state.holders.remove(key);
            }
            ours
        };
        if removed {
            self.inner.hub.notify(key);
        }
        Ok(())
    }

    async fn subscribe(&self, key: &str) -> Result<ReleaseEvents, LockError> {
        self.enter(key).await?;
        Ok(self.inner.hub.subscribe(key).events)
    }

    async fn inspect(&self, key: &str) -> Result<KeyStatus, LockError> {
        self.enter(key).await?;
        let now = Instant::now();
        let mut state = self.state();
        let last_token = state.fences.get(key).copied();
        let status = match state.live_holder(key, now) {
            Some(holder) => KeyStatus::held().remaining(holder.expires_at - now),
            None => KeyStatus::free(),
        };
        Ok(match last_token {
            Some(token) => status.last_token(token),
            None => status,
        })
    }

    async fn force_release(&self, key: &str) -> Result<bool, LockError> {
        self.enter(key).await?;
        Ok(self.force_expire(key))
    }
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("held", &self.held_count())
            .field("subscribed_keys", &self.subscribed_keys())
            .finish()
    }
}

/// The conformance harness for [`MemoryBackend`]: every locker is a clone
/// of one backend, like clients of one server. `cargo test -p
/// dlock-testkit` runs the whole suite with it, on a paused clock.
///
/// ```
/// use dlock_testkit::MemoryHarness;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// dlock_testkit::conformance::fencing_tokens_increase(&MemoryHarness::new()).await;
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryHarness {
    backend: MemoryBackend,
}

impl MemoryHarness {
    /// A harness over a fresh backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend, for fault injection.
    pub fn backend(&self) -> &MemoryBackend {
        &self.backend
    }
}

#[async_trait]
impl crate::conformance::Harness for MemoryHarness {
    async fn locker(&self) -> dlock_core::Locker {
        dlock_core::Locker::new(self.backend.clone())
    }

    async fn force_expire(&self, key: &str) {
        self.backend.force_expire(key);
    }

    async fn leftovers(&self, key: &str) -> usize {
        usize::from(self.backend.is_locked(key))
    }

    fn config(&self) -> crate::conformance::SuiteConfig {
        crate::conformance::SuiteConfig::default()
    }
}
