//! `MemoryBackend`: the whole lock protocol in process memory, on Tokio's clock.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use dlock_core::backend::{
    AcquireRequest, Attempt, Busy, ExtendOutcome, Grant, LeaderState, Lease, LockBackend, LockKind,
    OwnerToken, ProclaimOutcome, ReleaseEvents, ReleaseHub, ReleaseOutcome, ensure_same_kind,
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
    keys: HashMap<String, Entry>,
    /// The places of the readers and writers that wait, per key, in
    /// arrival order: what writer preference is decided by.
    lines: HashMap<String, Vec<Place>>,
    fences: HashMap<String, u64>,
    faults: Faults,
    operations: u64,
}

/// The live leases on one key and the kind they were taken as: one for a
/// mutex (a writer), any number of readers, up to the limit for a
/// semaphore. Entries without leases are removed.
struct Entry {
    kind: LockKind,
    leases: Vec<Holder>,
    /// An election's public value: its leader's, campaigned or proclaimed.
    value: String,
}

impl Entry {
    /// Whether the holders leave room for one more lease of kind `asked`.
    fn has_room_for(&self, asked: LockKind) -> bool {
        match (self.kind, asked) {
            (LockKind::Shared, LockKind::Shared) => true,
            (LockKind::Semaphore { permits }, _) => self.leases.len() < permits as usize,
            _ => self.leases.is_empty(),
        }
    }

    fn lease_of(&mut self, owner: &str) -> Option<&mut Holder> {
        self.leases.iter_mut().find(|holder| holder.owner == owner)
    }
}

struct Holder {
    owner: String,
    expires_at: Instant,
    token: u64,
}

/// A waiting reader's or writer's place in its key's line. It lasts until
/// a while after the waiter's next attempt is due, so that a waiter that
/// died is passed over.
struct Place {
    owner: String,
    kind: LockKind,
    expires_at: Instant,
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
            match state.keys.remove(key) {
                Some(entry) => entry.leases.iter().any(|holder| holder.expires_at > now),
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
        self.leases_on(key) > 0
    }

    /// Number of live leases on `key` (a semaphore's permits taken).
    pub fn leases_on(&self, key: &str) -> usize {
        let now = Instant::now();
        self.state()
            .live_entry(key, now)
            .map_or(0, |entry| entry.leases.len())
    }

    /// Number of readers and writers waiting in `key`'s line.
    pub fn waiting_on(&self, key: &str) -> usize {
        let now = Instant::now();
        self.state().live_line(key, now).len()
    }

    /// The fencing token of the live lease on `key` (for a semaphore, the
    /// oldest permit's), if any.
    pub fn holder_token(&self, key: &str) -> Option<FencingToken> {
        let now = Instant::now();
        self.state()
            .live_entry(key, now)
            .and_then(|entry| entry.leases.iter().map(|holder| holder.token).min())
            .map(FencingToken::new)
    }

    /// Number of live leases on all keys.
    pub fn held_count(&self) -> usize {
        let now = Instant::now();
        self.state()
            .keys
            .values()
            .flat_map(|entry| &entry.leases)
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
    /// The live leases on `key`; expired ones are removed first, and the
    /// entry with them when none is left.
    fn live_entry(&mut self, key: &str, now: Instant) -> Option<&mut Entry> {
        let empty = match self.keys.get_mut(key) {
            Some(entry) => {
                entry.leases.retain(|holder| holder.expires_at > now);
                entry.leases.is_empty()
            }
            None => return None,
        };
        if empty {
            self.keys.remove(key);
            return None;
        }
        self.keys.get_mut(key)
    }

    /// The places still live in `key`'s line, in arrival order; expired
    /// ones are removed first, and the line with them when none is left.
    fn live_line(&mut self, key: &str, now: Instant) -> &[Place] {
        let empty = match self.lines.get_mut(key) {
            Some(line) => {
                line.retain(|place| place.expires_at > now);
                line.is_empty()
            }
            None => return &[],
        };
        if empty {
            self.lines.remove(key);
        }
        self.lines.get(key).map_or(&[], Vec::as_slice)
    }

    /// Removes `owner`'s place in `key`'s line; whether it had one.
    fn leave_line(&mut self, key: &str, owner: &str) -> bool {
        let Some(line) = self.lines.get_mut(key) else {
            return false;
        };
        let before = line.len();
        line.retain(|place| place.owner != owner);
        let left = line.len() < before;
        if line.is_empty() {
            self.lines.remove(key);
        }
        left
    }

    /// For a read-write lock's reader or writer, or an election's
    /// candidate, that holds nothing yet: whether a place ahead of
    /// `owner`'s (all places, when it has none) keeps it out. Writers let
    /// the readers that came before them in first, readers the writers,
    /// and candidates the candidates (arrival order); when one is found,
    /// the moment it could run out.
    fn kept_out_by_line(&mut self, key: &str, owner: &str, kind: LockKind, now: Instant) -> Option<Instant> {
        let blocker = match kind {
            LockKind::Exclusive => LockKind::Shared,
            LockKind::Shared => LockKind::Exclusive,
            LockKind::Election => LockKind::Election,
            _ => return None,
        };
        let line = self.live_line(key, now);
        let mine = line
            .iter()
            .position(|place| place.owner == owner)
            .unwrap_or(line.len());
        line[..mine]
            .iter()
            .filter(|place| place.kind == blocker)
            .map(|place| place.expires_at)
            .min()
    }

    /// Takes or renews `owner`'s place at the end of `key`'s line, until a
    /// while after its next attempt is due.
    fn stand_in_line(&mut self, key: &str, owner: &str, kind: LockKind, until: Instant) {
        let line = self.lines.entry(key.to_owned()).or_default();
        match line.iter_mut().find(|place| place.owner == owner) {
            Some(place) => place.expires_at = until,
            None => line.push(Place {
                owner: owner.to_owned(),
                kind,
                expires_at: until,
            }),
        }
    }

    /// The live lease of `owner` on `key`, or why there is none.
    fn check_owner(
        &mut self,
        key: &str,
        owner: &OwnerToken,
        now: Instant,
    ) -> Result<&mut Holder, NotHeldReason> {
        let Some(entry) = self.live_entry(key, now) else {
            return Err(NotHeldReason::Expired);
        };
        let exclusive = matches!(entry.kind, LockKind::Exclusive | LockKind::Election);
        match entry.lease_of(owner.as_str()) {
            Some(holder) => Ok(holder),
            // A mutex's key has one lease, someone else's now; a permit's
            // end takes nothing from the other permits.
            None if exclusive => Err(NotHeldReason::OtherOwner),
            None => Err(NotHeldReason::Expired),
        }
    }

    /// Removes `owner`'s lease on `key`; whether there was a live one.
    fn remove_lease(&mut self, key: &str, owner: &str, now: Instant) -> bool {
        let Some(entry) = self.live_entry(key, now) else {
            return false;
        };
        let before = entry.leases.len();
        entry.leases.retain(|holder| holder.owner != owner);
        let removed = entry.leases.len() < before;
        if entry.leases.is_empty() {
            self.keys.remove(key);
        }
        removed
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt, LockError> {
        let (key, owner) = (request.key, request.owner.as_str());
        self.enter(key).await?;
        let now = Instant::now();
        let mut state = self.state();
        let validity = request.ttl.saturating_sub(drift_allowance(request.ttl));
        // When the key's holders keep this request out, the first moment
        // one of them may end.
        let mut kept_out_until = None;
        if let Some(entry) = state.live_entry(key, now) {
            ensure_same_kind(key, entry.kind, request.kind)?;
            if let Some(holder) = entry.lease_of(owner) {
                // A retried request of the same owner: same lease, same token.
                holder.expires_at = now + request.ttl;
                let token = FencingToken::new(holder.token);
                return Ok(Attempt::Acquired(Grant::new(token, validity)));
            }
            if !entry.has_room_for(request.kind) {
                kept_out_until = entry.leases.iter().map(|holder| holder.expires_at).min();
            }
        }
        let kept_out_until = kept_out_until.or_else(|| state.kept_out_by_line(key, owner, request.kind, now));
        if let Some(until) = kept_out_until {
            let remaining = until.saturating_duration_since(now);
            let lines_up = matches!(
                request.kind,
                LockKind::Exclusive | LockKind::Shared | LockKind::Election
            );
            if request.queue && lines_up {
                state.stand_in_line(key, owner, request.kind, now + remaining + request.ttl);
            }
            return Ok(Attempt::Busy(Busy::new().retry_after(remaining)));
        }
        state.leave_line(key, owner);
        let fence = state.fences.entry(key.to_owned()).or_insert(0);
        *fence += 1;
        let token = *fence;
        let entry = state.keys.entry(key.to_owned()).or_insert_with(|| Entry {
            kind: request.kind,
            leases: Vec::new(),
            value: String::new(),
        });
        entry.leases.push(Holder {
            owner: owner.to_owned(),
            expires_at: now + request.ttl,
            token,
        });
        let elected = request.kind == LockKind::Election;
        if elected {
            entry.value = request.value().to_owned();
        }
        drop(state);
        if elected {
            // Observers learn of the new leader.
            self.inner.hub.notify(key);
        }
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
                    state.remove_lease(lease.key(), lease.owner().as_str(), now);
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
            // Readers behind a writer that gave up may go in now.
            let left = state.leave_line(key, owner.as_str());
            state.remove_lease(key, owner.as_str(), now) || left
        };
        if removed {
            self.inner.hub.notify(key);
        }
        Ok(())
    }

    async fn proclaim(&self, lease: &Lease, value: &str) -> Result<ProclaimOutcome, LockError> {
        self.enter(lease.key()).await?;
        let now = Instant::now();
        let outcome = {
            let mut state = self.state();
            match state.check_owner(lease.key(), lease.owner(), now) {
                Ok(_) => match state.live_entry(lease.key(), now) {
                    Some(entry) if entry.kind == LockKind::Election => {
                        entry.value = value.to_owned();
                        ProclaimOutcome::Proclaimed
                    }
                    Some(entry) => {
                        return Err(LockError::WrongKind {
                            key: lease.key().to_owned(),
                            held_as: entry.kind.to_string(),
                            asked_as: LockKind::Election.to_string(),
                        });
                    }
                    None => ProclaimOutcome::NotHeld(NotHeldReason::Expired),
                },
                Err(reason) => ProclaimOutcome::NotHeld(reason),
            }
        };
        if outcome == ProclaimOutcome::Proclaimed {
            self.inner.hub.notify(lease.key());
        }
        Ok(outcome)
    }

    async fn leader(&self, key: &str) -> Result<Option<LeaderState>, LockError> {
        self.enter(key).await?;
        let now = Instant::now();
        let mut state = self.state();
        let Some(entry) = state.live_entry(key, now) else {
            return Ok(None);
        };
        ensure_same_kind(key, entry.kind, LockKind::Election)?;
        Ok(entry.leases.first().map(|holder| {
            LeaderState::new(
                entry.value.clone(),
                FencingToken::new(holder.token),
                Some(holder.expires_at - now),
            )
        }))
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
        let waiting = state.live_line(key, now).len();
        let status = match state.live_entry(key, now) {
            Some(entry) => {
                // The lease that ends last: until then the key stays in use.
                let last_to_end = entry.leases.iter().map(|holder| holder.expires_at).max();
                let status = KeyStatus::held().kind(entry.kind).holders(entry.leases.len());
                match last_to_end {
                    Some(at) => status.remaining(at - now),
                    None => status,
                }
            }
            None => KeyStatus::free(),
        }
        .waiting(waiting);
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
