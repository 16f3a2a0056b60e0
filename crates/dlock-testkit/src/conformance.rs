//! The behaviour suite every backend runs, the in-memory one included.
//!
//! Each check is a `pub async fn` taking a [`Harness`]; a backend's tests
//! call them all through [`conformance_tests!`](crate::conformance_tests),
//! which makes one `#[test]` per check. Checks panic with a message on
//! failure. Timing bounds are loose enough for real servers on a busy
//! machine, and exact on the in-memory backend under a paused clock.
//!
//! ```
//! use async_trait::async_trait;
//! use dlock_core::Locker;
//! use dlock_testkit::MemoryBackend;
//! use dlock_testkit::conformance::{self, Harness, SuiteConfig};
//!
//! struct Memory(MemoryBackend);
//!
//! #[async_trait]
//! impl Harness for Memory {
//!     async fn locker(&self) -> Locker { Locker::new(self.0.clone()) }
//!     async fn force_expire(&self, key: &str) { self.0.force_expire(key); }
//!     async fn leftovers(&self, key: &str) -> usize { usize::from(self.0.is_locked(key)) }
//!     fn config(&self) -> SuiteConfig { SuiteConfig::default() }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! conformance::acquire_release(&Memory(MemoryBackend::new())).await;
//! # }
//! ```

use std::time::Duration;

use async_trait::async_trait;
use dlock_core::{FencingToken, LockError, Locker, MAX_KEY_LEN, NotHeldReason};
use tokio::time::{Instant, sleep, timeout};

/// What the suite needs from a backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A locker over a new client of the backend (its own connections), as
    /// another process would have.
    async fn locker(&self) -> Locker;

    /// Ends the lease on `key` on the server, as if its holder had paused
    /// past its TTL (for Redis: delete the key).
    async fn force_expire(&self, key: &str);

    /// How many entries the server still keeps for `key` (a lock, queue
    /// entries); 0 means nothing was left behind.
    async fn leftovers(&self, key: &str) -> usize;

    /// Timing and capabilities.
    fn config(&self) -> SuiteConfig;
}

/// What the paused holder saw when it resumed.
#[derive(Debug)]
struct Resumed {
    token: FencingToken,
    still_held: bool,
    lost_signalled: bool,
    late_write: Result<(), crate::StaleToken>,
}

/// Timing and capability flags for a suite run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SuiteConfig {
    /// A short TTL for expiry and renewal checks (default 1 s). Use the
    /// backend's smallest reliable lease (etcd: whole seconds).
    pub short_ttl: Duration,
    /// How quickly a release must wake a waiter (default 1 s). The holder's
    /// TTL in that check is 30 s, so only a notification can meet it.
    pub wake_bound: Duration,
    /// The backend grants in arrival order (checked when set).
    pub fifo: bool,
}

impl Default for SuiteConfig {
    fn default() -> Self {
        SuiteConfig {
            short_ttl: Duration::from_secs(1),
            wake_bound: Duration::from_secs(1),
            fifo: false,
        }
    }
}

impl SuiteConfig {
    /// Sets the short TTL.
    pub fn short_ttl(mut self, ttl: Duration) -> Self {
        self.short_ttl = ttl;
        self
    }

    /// Sets the wake-up bound.
    pub fn wake_bound(mut self, bound: Duration) -> Self {
        self.wake_bound = bound;
        self
    }

    /// Sets the FIFO flag.
    pub fn fifo(mut self, fifo: bool) -> Self {
        self.fifo = fifo;
        self
    }
}

const LONG_TTL: Duration = Duration::from_secs(30);

/// A key no other check or run uses, so that suites can share a server.
pub fn unique_key(check: &str) -> String {
    format!("conformance/{check}/{:016x}", fastrand::u64(..))
}

/// Acquire a free key, release it, acquire it again with a higher token.
pub async fn acquire_release(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("acquire_release");
    let guard = locker.lock(&key).ttl(LONG_TTL).await.expect("acquire a free key");
    assert_eq!(guard.key(), key);
    assert!(guard.is_held(), "a fresh guard is held");
    let first = guard.fencing_token();
    guard.release().await.expect("release a held lock");
    assert_eq!(harness.leftovers(&key).await, 0, "release left state behind");
    let again = locker.try_lock(&key).await.expect("a released key is free");
    assert!(again.fencing_token() > first, "token must rise on re-acquisition");
    again.release().await.expect("release");
}

/// `try_lock` on a key held by another client fails at once with `Contended`.
pub async fn try_lock_on_held_key(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let other = harness.locker().await;
    let key = unique_key("try_lock_on_held_key");
    let guard = holder.lock(&key).ttl(LONG_TTL).await.expect("acquire");
    let started = Instant::now();
    match other.try_lock(&key).await {
        Err(LockError::Contended { key: reported }) => assert_eq!(reported, key),
        other => panic!("expected Contended, got {other:?}"),
    }
    // A wait would last until the release below, so never end; the bound is
    // loose because a loaded CI server can take hundreds of ms per request.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "try_lock must not wait"
    );
    guard.release().await.expect("release");
    let second = other.try_lock(&key).await.expect("free after release");
    second.release().await.expect("release");
}

/// `lock().wait(d)` on a held key gives up with `Timeout` after about `d`,
/// and leaves the holder alone.
pub async fn wait_times_out(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let waiter = harness.locker().await;
    let key = unique_key("wait_times_out");
    let guard = holder.lock(&key).ttl(LONG_TTL).await.expect("acquire");
    let wait = harness.config().short_ttl;
    let started = Instant::now();
    match waiter.lock(&key).wait(wait).await {
        Err(LockError::Timeout {
            key: reported,
            waited,
        }) => {
            assert_eq!(reported, key);
            assert!(
                waited >= wait,
                "gave up after {waited:?}, before the wait of {wait:?}"
            );
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(started.elapsed() < wait * 3, "waited far past the deadline");
    assert!(guard.is_held(), "the holder is unaffected");
    guard.release().await.expect("release");
    until_nothing_left(harness, &key, "a timed-out waiter left state behind").await;
}

/// Waits until the server keeps nothing for `key`: the clean-up after a
/// request that ended without a guard runs in a spawned task, so it may
/// land a moment after the request returned. Fails with `what` if state
/// is still there after 5 s.
async fn until_nothing_left(harness: &dyn Harness, key: &str, what: &str) {
    let give_up_at = Instant::now() + Duration::from_secs(5);
    loop {
        let left = harness.leftovers(key).await;
        if left == 0 {
            return;
        }
        assert!(Instant::now() < give_up_at, "{what}: {left} entries after 5 s");
        sleep(Duration::from_millis(20)).await;
    }
}

/// A release wakes a waiter at once: far sooner than the holder's 30 s TTL,
/// which is when a waiter without notifications would look again.
pub async fn waiter_woken_on_release(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let waiter = harness.locker().await;
    let key = unique_key("waiter_woken_on_release");
    let guard = holder.lock(&key).ttl(LONG_TTL).await.expect("acquire");
    let first = guard.fencing_token();
    let waiting = {
        let key = key.clone();
        tokio::spawn(async move {
            let guard = waiter.lock(&key).wait(Duration::from_secs(25)).await;
            (guard, Instant::now())
        })
    };
    // Let the waiter find the key busy and subscribe.
    sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the waiter must still be waiting");
    let released_at = Instant::now();
    guard.release().await.expect("release");
    let (acquired, acquired_at) = waiting.await.expect("waiter task");
    let acquired = acquired.expect("the waiter acquires after the release");
    let latency = acquired_at - released_at;
    let bound = harness.config().wake_bound;
    assert!(
        latency < bound,
        "the waiter took {latency:?} after the release (bound {bound:?}): it was not woken by a notification"
    );
    assert!(acquired.fencing_token() > first);
    acquired.release().await.expect("release");
}

/// A lease that is neither renewed nor released frees the key after its TTL.
pub async fn ttl_expiry_frees_key(harness: &dyn Harness) {
    let crashed = harness.locker().await;
    let waiter = harness.locker().await;
    let key = unique_key("ttl_expiry_frees_key");
    let ttl = harness.config().short_ttl;
    let started = Instant::now();
    let guard = crashed
        .lock(&key)
        .ttl(ttl)
        .auto_renew(false)
        .await
        .expect("acquire");
    let first = guard.fencing_token();
    guard.forget(); // as if the process died
    let next = waiter
        .lock(&key)
        .wait(ttl * 5)
        .await
        .expect("the key frees itself after the TTL");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= ttl * 9 / 10,
        "acquired after {elapsed:?}, before the TTL of {ttl:?} ran out"
    );
    assert!(next.fencing_token() > first);
    next.release().await.expect("release");
}

/// A forgotten guard whose lock was auto-renewed stops renewing: the key
/// frees itself after the TTL, as if the holder's process had died (even
/// where the backend keeps a shared lease alive for its other locks).
pub async fn forgotten_renewed_lock_expires(harness: &dyn Harness) {
    let crashed = harness.locker().await;
    let waiter = harness.locker().await;
    let key = unique_key("forgotten_renewed_lock_expires");
    let ttl = harness.config().short_ttl;
    // Something else stays held, so that a backend's shared lease stays alive.
    let other = crashed
        .lock(format!("{key}/other"))
        .ttl(ttl)
        .await
        .expect("acquire the other key");
    let started = Instant::now();
    let guard = crashed.lock(&key).ttl(ttl).await.expect("acquire");
    let first = guard.fencing_token();
    guard.forget();
    let next = waiter
        .lock(&key)
        .wait(ttl * 5)
        .await
        .expect("the forgotten lock frees itself after the TTL");
    assert!(
        started.elapsed() >= ttl * 9 / 10,
        "acquired after {:?}, before the TTL of {ttl:?} ran out",
        started.elapsed()
    );
    assert!(next.fencing_token() > first);
    next.release().await.expect("release");
    other.release().await.expect("release the other key");
}

/// Auto-renewal keeps a lock for several TTLs.
pub async fn renewal_keeps_lock(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let other = harness.locker().await;
    let key = unique_key("renewal_keeps_lock");
    let ttl = harness.config().short_ttl;
    let guard = holder.lock(&key).ttl(ttl).await.expect("acquire");
    sleep(ttl * 3).await;
    assert!(guard.is_held(), "renewal must keep the lock past its TTL");
    assert!(
        matches!(other.try_lock(&key).await, Err(LockError::Contended { .. })),
        "the renewed lock must still exclude others"
    );
    guard.release().await.expect("a renewed lock releases cleanly");
}

/// Without auto-renewal the guard turns lost when its TTL runs out.
pub async fn unrenewed_guard_turns_lost(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("unrenewed_guard_turns_lost");
    let ttl = harness.config().short_ttl;
    let guard = locker
        .lock(&key)
        .ttl(ttl)
        .auto_renew(false)
        .await
        .expect("acquire");
    timeout(ttl * 2, guard.lost())
        .await
        .expect("lost() must resolve when the TTL runs out");
    assert!(!guard.is_held());
    // The guard gives up a little before the server does (drift allowance);
    // once the server's lease is over too, a release finds nothing.
    sleep(ttl / 2).await;
    match guard.release().await {
        Err(LockError::NotHeld { reason, .. }) => assert_eq!(reason, NotHeldReason::Expired),
        other => panic!("expected NotHeld after expiry, got {other:?}"),
    }
}

/// `extend` moves the lease's end, checked by the owner.
pub async fn extend_moves_deadline(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let other = harness.locker().await;
    let key = unique_key("extend_moves_deadline");
    let ttl = harness.config().short_ttl;
    let guard = holder
        .lock(&key)
        .ttl(ttl)
        .auto_renew(false)
        .await
        .expect("acquire");
    guard.extend(ttl * 4).await.expect("extend a held lock");
    sleep(ttl * 2).await;
    assert!(guard.is_held(), "the extension must hold past the first TTL");
    assert!(matches!(
        other.try_lock(&key).await,
        Err(LockError::Contended { .. })
    ));
    guard.release().await.expect("release");
}

/// A lease ended behind the holder's back is noticed within its TTL.
pub async fn loss_detected_on_force_expiry(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("loss_detected_on_force_expiry");
    let ttl = harness.config().short_ttl;
    let guard = locker.lock(&key).ttl(ttl).await.expect("acquire");
    harness.force_expire(&key).await;
    timeout(ttl * 2, guard.lost())
        .await
        .expect("lost() must resolve within the TTL");
    assert!(!guard.is_held());
    assert!(matches!(guard.extend(ttl).await, Err(LockError::Lost { .. })));
    match guard.release().await {
        Err(LockError::NotHeld { reason, .. }) => assert_eq!(reason, NotHeldReason::Expired),
        other => panic!("expected NotHeld, got {other:?}"),
    }
}

/// After a foreign takeover the old holder learns of its loss, its release
/// fails with `NotHeld`, and the new holder keeps the lock.
pub async fn loss_detected_on_takeover(harness: &dyn Harness) {
    let old = harness.locker().await;
    let new = harness.locker().await;
    let third = harness.locker().await;
    let key = unique_key("loss_detected_on_takeover");
    let ttl = harness.config().short_ttl;
    let stale = old.lock(&key).ttl(ttl).await.expect("acquire");
    harness.force_expire(&key).await;
    let current = new
        .lock(&key)
        .ttl(LONG_TTL)
        .wait(ttl * 2)
        .await
        .expect("take over");
    assert!(current.fencing_token() > stale.fencing_token());
    timeout(ttl * 2, stale.lost())
        .await
        .expect("the old holder must learn of the loss");
    match stale.release().await {
        Err(LockError::NotHeld { reason, .. }) => assert_eq!(reason, NotHeldReason::OtherOwner),
        other => panic!("a non-owner's release must fail with NotHeld, got {other:?}"),
    }
    assert!(
        matches!(third.try_lock(&key).await, Err(LockError::Contended { .. })),
        "a failed foreign release must not free the key"
    );
    assert!(current.is_held());
    current.release().await.expect("the new holder releases");
}

/// `with_lock` drops the critical section when the lock is lost and reports `Lost`.
pub async fn with_lock_stops_on_loss(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("with_lock_stops_on_loss");
    let ttl = harness.config().short_ttl;
    let started = Instant::now();
    let outcome = locker
        .lock(&key)
        .ttl(ttl)
        .with_lock(async |guard| {
            harness.force_expire(guard.key()).await;
            sleep(ttl * 20).await;
            "finished"
        })
        .await;
    assert!(matches!(outcome, Err(LockError::Lost { .. })), "got {outcome:?}");
    assert!(
        started.elapsed() < ttl * 5,
        "the critical section was not stopped in time"
    );
    let value = locker
        .with_lock(&key, async |guard| guard.fencing_token())
        .await
        .expect("with_lock on a free key");
    assert!(value.get() > 0);
    assert_eq!(harness.leftovers(&key).await, 0, "with_lock must release");
}

/// Tokens strictly increase across clients, releases, expiries and takeovers.
pub async fn fencing_tokens_increase(harness: &dyn Harness) {
    let mut lockers = Vec::new();
    for _ in 0..3 {
        lockers.push(harness.locker().await);
    }
    let key = unique_key("fencing_tokens_increase");
    let mut previous = None;
    for round in 0..30 {
        let locker = &lockers[round % lockers.len()];
        let guard = locker
            .lock(&key)
            .ttl(LONG_TTL)
            .wait(LONG_TTL)
            .await
            .expect("acquire");
        let token = guard.fencing_token();
        if let Some(previous) = previous {
            assert!(token > previous, "round {round}: token {token} after {previous}");
        }
        previous = Some(token);
        if round % 5 == 4 {
            harness.force_expire(&key).await;
            drop(guard);
        } else {
            guard.release().await.expect("release");
        }
    }
}

/// Locks on different keys do not affect each other.
pub async fn keys_are_independent(harness: &dyn Harness) {
    let one = harness.locker().await;
    let two = harness.locker().await;
    let first_key = unique_key("keys_are_independent_a");
    let second_key = unique_key("keys_are_independent_b");
    let first = one.lock(&first_key).ttl(LONG_TTL).await.expect("first key");
    let second = two.try_lock(&second_key).await.expect("a different key is free");
    first.release().await.expect("release first");
    assert!(second.is_held());
    assert!(matches!(
        one.try_lock(&second_key).await,
        Err(LockError::Contended { .. })
    ));
    second.release().await.expect("release second");
}

/// A dropped guard releases in the background: the next waiter gets the key
/// without waiting for the TTL.
pub async fn dropped_guard_releases(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let waiter = harness.locker().await;
    let key = unique_key("dropped_guard_releases");
    let guard = holder.lock(&key).ttl(LONG_TTL).await.expect("acquire");
    drop(guard);
    let started = Instant::now();
    let next = waiter
        .lock(&key)
        .wait(Duration::from_secs(20))
        .await
        .expect("acquire after drop");
    let bound = harness.config().wake_bound;
    assert!(
        started.elapsed() < bound,
        "a dropped guard was not released promptly"
    );
    next.release().await.expect("release");
}

/// Dropping a waiting request (timeout, abort) leaves no lock and no queue
/// entry behind.
pub async fn cancelled_waiters_leave_nothing(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let waiter = harness.locker().await;
    let key = unique_key("cancelled_waiters_leave_nothing");
    let guard = holder.lock(&key).ttl(LONG_TTL).await.expect("acquire");

    let dropped = timeout(Duration::from_millis(200), waiter.lock(&key)).await;
    assert!(dropped.is_err(), "the waiter must still be waiting when dropped");
    let aborted = {
        let waiter = waiter.clone();
        let key = key.clone();
        tokio::spawn(async move { waiter.lock(&key).await })
    };
    sleep(Duration::from_millis(200)).await;
    aborted.abort();
    assert!(aborted.await.is_err_and(|error| error.is_cancelled()));

    guard.release().await.expect("release");
    until_nothing_left(harness, &key, "a cancelled waiter left state behind").await;
    let after = holder.try_lock(&key).await.expect("nobody may hold the key now");
    after.release().await.expect("release");
}

/// Bad input gives a typed error and leaves nothing behind.
pub async fn bad_input_is_rejected(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("bad_input_is_rejected");
    let long_key = "k".repeat(MAX_KEY_LEN + 1);
    for bad_key in ["", long_key.as_str(), "line\nbreak", "nul\0byte"] {
        match locker.try_lock(bad_key).await {
            Err(LockError::InvalidKey { reason, .. }) => assert!(!reason.is_empty()),
            other => panic!("key {bad_key:?}: expected InvalidKey, got {other:?}"),
        }
        assert!(matches!(
            locker.lock(bad_key).await,
            Err(LockError::InvalidKey { .. })
        ));
    }
    for bad_ttl in [Duration::ZERO, Duration::from_millis(1), Duration::MAX] {
        match locker.lock(&key).ttl(bad_ttl).await {
            Err(LockError::InvalidOptions { key: reported, .. }) => {
                assert_eq!(reported.as_deref(), Some(key.as_str()))
            }
            other => panic!("ttl {bad_ttl:?}: expected InvalidOptions, got {other:?}"),
        }
    }
    for bad_wait in [Duration::ZERO, Duration::MAX] {
        assert!(
            matches!(
                locker.lock(&key).wait(bad_wait).await,
                Err(LockError::InvalidOptions { .. })
            ),
            "wait {bad_wait:?} must be refused"
        );
    }
    let guard = locker.lock(&key).ttl(LONG_TTL).await.expect("valid request");
    for bad_extension in [Duration::ZERO, Duration::MAX] {
        assert!(matches!(
            guard.extend(bad_extension).await,
            Err(LockError::InvalidOptions { .. })
        ));
    }
    assert!(guard.is_held(), "a refused extension leaves the lock held");
    guard.release().await.expect("release");
    assert_eq!(harness.leftovers(&key).await, 0);
}

/// Waiters all get the lock in turn; with the FIFO capability, in the order
/// they arrived.
pub async fn waiters_served_in_turn(harness: &dyn Harness) {
    let holder = harness.locker().await;
    let key = unique_key("waiters_served_in_turn");
    let guard = holder.lock(&key).ttl(LONG_TTL).await.expect("acquire");
    let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    for position in 0..4 {
        let locker = harness.locker().await;
        let key = key.clone();
        let order_tx = order_tx.clone();
        waiters.push(tokio::spawn(async move {
            let guard = locker.lock(&key).wait(LONG_TTL).await.expect("waiter acquires");
            order_tx.send(position).expect("order channel");
            sleep(Duration::from_millis(20)).await;
            guard.release().await.expect("waiter releases");
        }));
        // Arrival order is what FIFO promises; space the arrivals out.
        sleep(Duration::from_millis(150)).await;
    }
    drop(order_tx);
    guard.release().await.expect("release");
    for waiter in waiters {
        waiter.await.expect("waiter task");
    }
    let mut order = Vec::new();
    while let Some(position) = order_rx.recv().await {
        order.push(position);
    }
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 1, 2, 3], "every waiter must get the lock once");
    if harness.config().fifo {
        assert_eq!(
            order,
            vec![0, 1, 2, 3],
            "a FIFO backend must serve waiters in arrival order"
        );
    }
}

/// Operator views: `inspect` shows a held key with its holder's token (and
/// a free key as free); `force_release` ends the lock whoever holds it,
/// the holder learns it, and the key is free for the next client.
pub async fn operator_views_show_and_break_a_lock(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("operator_views");
    let guard = locker.lock(&key).ttl(LONG_TTL).await.expect("acquire");
    let status = locker.inspect(&key).await.expect("inspect a held key");
    assert!(status.held, "{status:?}");
    assert_eq!(status.last_token, Some(guard.fencing_token().get()), "{status:?}");
    assert!(status.remaining.is_none_or(|left| left <= LONG_TTL), "{status:?}");
    let operator = harness.locker().await;
    assert!(
        operator.force_release(&key).await.expect("force release"),
        "the key was held"
    );
    timeout(LONG_TTL / 2, guard.lost())
        .await
        .expect("the holder learns that its lock was broken");
    let status = operator.inspect(&key).await.expect("inspect a free key");
    assert!(!status.held, "{status:?}");
    let next = operator.try_lock(&key).await.expect("the key is free");
    assert!(next.fencing_token() > guard.fencing_token());
    next.release().await.expect("release");
    assert!(
        matches!(operator.inspect("").await, Err(LockError::InvalidKey { .. })),
        "a bad key is refused before it reaches the backend"
    );
    drop(guard);
}

/// Generates one test per conformance check.
///
/// The first argument is the test attribute, the second an expression that
/// builds the harness (it may `.await`):
///
/// ```text
/// dlock_testkit::conformance_tests!(#[tokio::test(start_paused = true)] MemoryHarness::new());
/// ```
///
/// The list of checks below is the only one: [`CHECKS`] is made from it,
/// and a unit test fails when a `pub async fn` check of this module is
/// missing from it (or listed without existing).
#[macro_export]
macro_rules! conformance_tests {
    (#[$attribute:meta] $harness:expr) => {
        $crate::conformance_tests!(@checks tests (#[$attribute] $harness));
    };
    (@checks $then:ident $arguments:tt) => {
        $crate::conformance_tests! { @$then $arguments;
            acquire_release,
            try_lock_on_held_key,
            wait_times_out,
            waiter_woken_on_release,
            ttl_expiry_frees_key,
            forgotten_renewed_lock_expires,
            renewal_keeps_lock,
            unrenewed_guard_turns_lost,
            extend_moves_deadline,
            loss_detected_on_force_expiry,
            loss_detected_on_takeover,
            with_lock_stops_on_loss,
            fencing_tokens_increase,
            keys_are_independent,
            dropped_guard_releases,
            cancelled_waiters_leave_nothing,
            bad_input_is_rejected,
            waiters_served_in_turn,
            paused_holder_is_fenced,
            operator_views_show_and_break_a_lock,
        }
    };
    (@tests (#[$attribute:meta] $harness:expr); $($check:ident,)*) => {
        $(
            #[$attribute]
            async fn $check() {
                let harness = $harness;
                $crate::conformance::$check(&harness).await;
            }
        )*
    };
    (@names (); $($check:ident,)*) => {
        &[$(stringify!($check)),*]
    };
}

/// The names of every check, in the order [`conformance_tests!`](crate::conformance_tests) runs them.
pub const CHECKS: &[&str] = crate::conformance_tests!(@checks names ());

/// A holder whose whole process stalls past its TTL (a long GC pause, a
/// SIGSTOP, a VM migration): when it resumes, its guard reports the loss
/// (`is_held()` false, `lost()` resolved), another client holds the key
/// with a higher token, and the paused holder's late write is turned away
/// by the fence.
///
/// Each client runs on a thread of its own with its own runtime, and makes
/// its locker there, so the stall stops everything the holder's process
/// runs: its renewals, its connections, a shared lease keep-alive.
pub async fn paused_holder_is_fenced(harness: &dyn Harness) {
    let key = unique_key("paused_holder_is_fenced");
    let ttl = harness.config().short_ttl;
    let stall = ttl * 4;
    let resource = crate::FencedResource::new();
    let (key, resource) = (&key, &resource);
    let run = || {
        std::thread::scope(|scope| {
            let (acquired, acquired_seen) = std::sync::mpsc::channel::<()>();
            let (resumed, resumed_seen) = std::sync::mpsc::channel::<()>();
            let holder = scope.spawn(move || {
                client_runtime().block_on(async {
                    let locker = harness.locker().await;
                    let guard = locker.lock(key).ttl(ttl).await.expect("the holder acquires");
                    let token = guard.fencing_token();
                    resource.write(0, token).expect("the holder's first write");
                    let _ = acquired.send(());
                    // The whole process stalls: no renewal, no keep-alive.
                    std::thread::sleep(stall);
                    let still_held = guard.is_held();
                    let lost_signalled = timeout(ttl, guard.lost()).await.is_ok();
                    let late_write = resource.write(0, token);
                    let _ = resumed.send(());
                    Resumed {
                        token,
                        still_held,
                        lost_signalled,
                        late_write,
                    }
                })
            });
            let rival = scope.spawn(move || {
                client_runtime().block_on(async {
                    let locker = harness.locker().await;
                    acquired_seen.recv().expect("the holder acquired");
                    let guard = locker
                        .lock(key)
                        .ttl(LONG_TTL)
                        .wait(stall - ttl)
                        .await
                        .expect("the rival gets the key once the paused holder's lease ran out");
                    let token = guard.fencing_token();
                    resource.write(1, token).expect("the rival's write");
                    // Hold until the paused holder has looked around.
                    let _ = resumed_seen.recv();
                    let still_held = guard.is_held();
                    guard.release().await.expect("the rival releases");
                    (token, still_held)
                })
            });
            (holder.join(), rival.join())
        })
    };
    let (holder, rival) =
        if tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
            tokio::task::block_in_place(run)
        } else {
            run()
        };
    let resumed = holder.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    let (rival_token, rival_held) = rival.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    assert!(
        !resumed.still_held,
        "a guard that stalled past its TTL must not claim the lock"
    );
    assert!(
        resumed.lost_signalled,
        "lost() must resolve once the stalled holder resumes"
    );
    assert!(
        rival_token > resumed.token,
        "the rival's token {rival_token} must exceed the paused holder's {}",
        resumed.token
    );
    assert!(
        rival_held,
        "the rival held the key while the paused holder looked around"
    );
    match resumed.late_write {
        Err(stale) => assert_eq!(stale.highest, rival_token),
        Ok(()) => panic!("the paused holder's late write must be turned away by the fence"),
    }
    let report = resource.check();
    assert_eq!((report.accepted, report.rejected_stale), (2, 1), "{report:?}");
}

/// A runtime of its own for one simulated client process.
fn client_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime for a client thread")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::CHECKS;

    #[test]
    fn every_check_is_listed_once() {
        let defined: BTreeSet<&str> = include_str!("conformance.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("pub async fn "))
            .filter_map(|rest| rest.split_once("(harness: &dyn Harness)"))
            .map(|(name, _)| name)
            .collect();
        let listed: BTreeSet<&str> = CHECKS.iter().copied().collect();
        assert_eq!(listed.len(), CHECKS.len(), "a check is listed twice");
        assert_eq!(
            defined, listed,
            "conformance_tests! and the checks of conformance.rs differ"
        );
    }
}
