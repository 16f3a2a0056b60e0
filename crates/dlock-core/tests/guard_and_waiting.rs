//! The generic machinery of dlock-core (waiting, renewal, loss, clean-up)
//! against the in-memory backend, on a paused clock.

use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use dlock_core::{FencingToken, LockError, Locker, OwnerToken};
use dlock_testkit::MemoryBackend;
use tokio::time::{Instant, sleep, timeout};

fn setup() -> (MemoryBackend, Locker) {
    let backend = MemoryBackend::new();
    let locker = Locker::new(backend.clone());
    (backend, locker)
}

#[tokio::test(start_paused = true)]
async fn renewal_runs_every_third_of_the_ttl() {
    let (backend, locker) = setup();
    let guard = locker
        .lock("cadence")
        .ttl(Duration::from_secs(3))
        .await
        .expect("acquire");
    let before = backend.operations();
    sleep(Duration::from_secs(30)).await;
    let renewals = backend.operations() - before;
    // One renewal per second for 30 s, give or take the one in flight.
    assert!(
        (29..=31).contains(&renewals),
        "{renewals} renewals in 30 s with ttl 3 s"
    );
    assert!(guard.is_held());
    guard.release().await.expect("release");
}

#[tokio::test(start_paused = true)]
async fn renewal_survives_transient_errors() {
    let (backend, locker) = setup();
    let guard = locker
        .lock("transient")
        .ttl(Duration::from_secs(3))
        .await
        .expect("acquire");
    backend.fail_next(3);
    sleep(Duration::from_secs(10)).await;
    assert!(
        guard.is_held(),
        "three failed renewals inside the validity must not lose the lock"
    );
    guard.release().await.expect("release");
}

#[tokio::test(start_paused = true)]
async fn unreachable_backend_turns_the_guard_lost_by_its_validity() {
    let (backend, locker) = setup();
    let ttl = Duration::from_secs(3);
    let acquired_at = Instant::now();
    let guard = locker.lock("outage").ttl(ttl).await.expect("acquire");
    backend.set_unavailable(true);
    timeout(ttl * 2, guard.lost()).await.expect("lost() must resolve");
    let lost_after = acquired_at.elapsed();
    assert!(!guard.is_held());
    // Renewed last at about ttl/3; lost when that renewal's validity ran out.
    assert!(lost_after <= ttl + ttl / 3, "lost only after {lost_after:?}");
    backend.set_unavailable(false);
    assert!(matches!(guard.extend(ttl).await, Err(LockError::Lost { .. })));
}

#[tokio::test(start_paused = true)]
async fn a_slow_backend_cannot_keep_a_lock_past_its_validity() {
    let (backend, locker) = setup();
    let ttl = Duration::from_secs(3);
    let guard = locker.lock("slow").ttl(ttl).await.expect("acquire");
    backend.set_latency(Duration::from_secs(60));
    timeout(ttl * 2, guard.lost())
        .await
        .expect("a renewal that hangs must not keep the guard alive");
    assert!(!guard.is_held());
}

#[tokio::test(start_paused = true)]
async fn acquire_on_an_unavailable_backend_fails_with_the_key() {
    let (backend, locker) = setup();
    backend.set_unavailable(true);
    match locker.lock("down").wait(Duration::from_secs(1)).await {
        Err(error @ LockError::Unavailable { .. }) => {
            assert_eq!(error.key(), Some("down"));
            // The cause, said once: the backend's message (no generic advice appended).
            assert!(
                error
                    .to_string()
                    .ends_with("the in-memory backend is set unavailable (set_unavailable)"),
                "{error}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    backend.set_unavailable(false);
    sleep(Duration::from_millis(10)).await;
    assert_eq!(backend.held_count(), 0);
    assert_eq!(backend.subscribed_keys(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_wait_limit_rides_out_a_short_outage() {
    let (backend, locker) = setup();
    backend.set_unavailable(true);
    let outage = {
        let backend = backend.clone();
        tokio::spawn(async move {
            sleep(Duration::from_millis(300)).await;
            backend.set_unavailable(false);
        })
    };
    let began = Instant::now();
    let guard = locker
        .lock("blip")
        .wait(Duration::from_secs(5))
        .await
        .expect("the backend came back within the wait limit");
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "took {:?}",
        began.elapsed()
    );
    outage.await.expect("outage task");
    guard.release().await.expect("release");
}

#[tokio::test(start_paused = true)]
async fn without_a_wait_limit_an_outage_ends_the_request_at_once() {
    let (backend, locker) = setup();
    backend.set_unavailable(true);
    let began = Instant::now();
    let outcome = locker.lock("down-forever").await;
    assert!(
        matches!(outcome, Err(LockError::Unavailable { .. })),
        "{outcome:?}"
    );
    assert_eq!(
        began.elapsed(),
        Duration::ZERO,
        "no limit: the first error ends it"
    );
    backend.set_unavailable(false);
}

#[tokio::test(start_paused = true)]
async fn waiters_do_not_poll() {
    let (backend, locker) = setup();
    let holder = locker
        .lock("quiet")
        .ttl(Duration::from_secs(60))
        .auto_renew(false)
        .await
        .expect("acquire");
    let waiter = {
        let locker = locker.clone();
        tokio::spawn(async move { locker.lock("quiet").wait(Duration::from_secs(50)).await })
    };
    sleep(Duration::from_millis(10)).await;
    let before = backend.operations();
    sleep(Duration::from_secs(40)).await;
    assert_eq!(
        backend.operations(),
        before,
        "a waiter must sleep until notified or the TTL hint"
    );
    holder.release().await.expect("release");
    let guard = waiter.await.expect("task").expect("acquire after release");
    assert_eq!(guard.fencing_token(), FencingToken::new(2));
    guard.release().await.expect("release");
}

#[tokio::test(start_paused = true)]
async fn waiter_without_notification_retries_when_the_ttl_hint_runs_out() {
    let (backend, locker) = setup();
    let ttl = Duration::from_secs(5);
    let holder = locker
        .lock("hint")
        .ttl(ttl)
        .auto_renew(false)
        .await
        .expect("acquire");
    let started = Instant::now();
    // The holder vanishes without a release: only the TTL hint can wake the waiter.
    holder.forget();
    let guard = locker
        .lock("hint")
        .wait(ttl * 2)
        .await
        .expect("acquire after expiry");
    let waited = started.elapsed();
    assert!(
        waited >= ttl && waited < ttl + Duration::from_secs(1),
        "waited {waited:?}"
    );
    guard.release().await.expect("release");
    assert_eq!(backend.held_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn cancelled_waiters_unsubscribe() {
    let (backend, locker) = setup();
    let holder = locker.lock("cancel").await.expect("acquire");
    for _ in 0..5 {
        assert!(
            timeout(Duration::from_millis(100), locker.lock("cancel"))
                .await
                .is_err()
        );
    }
    assert_eq!(
        backend.subscribed_keys(),
        0,
        "dropped waiters must not leave subscriptions"
    );
    holder.release().await.expect("release");
}

#[tokio::test(start_paused = true)]
async fn a_request_cancelled_mid_attempt_leaves_no_lock() {
    let (backend, locker) = setup();
    backend.set_latency(Duration::from_millis(100));
    assert!(
        timeout(Duration::from_millis(50), locker.lock("mid-flight"))
            .await
            .is_err()
    );
    sleep(Duration::from_secs(1)).await;
    assert_eq!(backend.held_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn with_lock_returns_the_value_and_releases() {
    let (backend, locker) = setup();
    let token = tokio::spawn({
        let locker = locker.clone();
        async move {
            locker
                .with_lock("scoped", async |guard| guard.fencing_token())
                .await
        }
    })
    .await
    .expect("with_lock runs in a spawned (Send) task")
    .expect("with_lock");
    assert_eq!(token, FencingToken::new(1));
    sleep(Duration::from_millis(1)).await;
    assert!(!backend.is_locked("scoped"));
}

#[tokio::test(start_paused = true)]
async fn with_lock_without_renewal_stops_at_the_ttl() {
    let (_backend, locker) = setup();
    let ttl = Duration::from_secs(2);
    let started = Instant::now();
    let outcome = locker
        .lock("short")
        .ttl(ttl)
        .auto_renew(false)
        .with_lock(async |_guard| sleep(Duration::from_secs(60)).await)
        .await;
    assert!(matches!(outcome, Err(LockError::Lost { .. })));
    assert!(started.elapsed() <= ttl);
}

#[tokio::test(start_paused = true)]
async fn manual_extension_sets_the_renewal_length() {
    let (backend, locker) = setup();
    let guard = locker
        .lock("longer")
        .ttl(Duration::from_secs(3))
        .await
        .expect("acquire");
    guard.extend(Duration::from_secs(30)).await.expect("extend");
    let before = backend.operations();
    sleep(Duration::from_secs(25)).await;
    // Renewals now come every 10 s instead of every second.
    let renewals = backend.operations() - before;
    assert!(
        (2..=3).contains(&renewals),
        "{renewals} renewals in 25 s after extending to 30 s"
    );
    guard.release().await.expect("release");
}

#[tokio::test(start_paused = true)]
async fn errors_name_the_key_and_the_fix() {
    let (_backend, locker) = setup();
    let _guard = locker.lock("orders/42").await.expect("acquire");
    let contended = locker.try_lock("orders/42").await.expect_err("held");
    assert!(contended.to_string().contains("`orders/42`"), "{contended}");
    let timeout = locker
        .lock("orders/42")
        .wait(Duration::from_millis(100))
        .await
        .expect_err("held");
    assert!(timeout.to_string().contains("raise `.wait()`"), "{timeout}");
    let zero_wait = locker
        .lock("orders/42")
        .wait(Duration::ZERO)
        .await
        .expect_err("zero wait");
    assert!(zero_wait.to_string().contains("try_lock"), "{zero_wait}");
    let long = "x".repeat(10_000);
    let too_long = locker.try_lock(long.as_str()).await.expect_err("long key");
    assert!(
        too_long.to_string().len() < 400,
        "the message must not repeat a huge key"
    );
}

#[test]
fn owner_tokens_are_random_and_never_printed() {
    let first = OwnerToken::generate().expect("random");
    let second = OwnerToken::generate().expect("random");
    assert_ne!(first, second);
    assert_eq!(first.as_str().len(), 32);
    assert!(first.as_str().bytes().all(|byte| byte.is_ascii_hexdigit()));
    assert!(!format!("{first:?}").contains(first.as_str()));
}

/// Polls a future to completion on this thread, without any Tokio runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct ThreadWaker(std::thread::Thread);
    impl Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        std::thread::park();
    }
}

#[test]
fn locking_outside_a_tokio_runtime_is_an_error_not_a_panic() {
    let locker = Locker::new(MemoryBackend::new());
    match block_on(locker.try_lock("no-runtime")) {
        Err(LockError::Unsupported { key, what }) => {
            assert_eq!(key.as_deref(), Some("no-runtime"));
            assert!(what.contains("Tokio"));
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

/// A backend that answers its first attempts like a Redlock split vote:
/// busy, with a hold-off, and wakes every subscriber at once.
struct SplitVotes {
    inner: MemoryBackend,
    hold_offs_left: std::sync::Mutex<usize>,
    attempts: std::sync::Mutex<Vec<Instant>>,
}

#[dlock_core::async_trait]
impl dlock_core::LockBackend for SplitVotes {
    async fn try_acquire(
        &self,
        request: &dlock_core::AcquireRequest<'_>,
    ) -> Result<dlock_core::Attempt, LockError> {
        self.attempts.lock().expect("attempts").push(Instant::now());
        {
            let mut left = self.hold_offs_left.lock().expect("counter");
            if *left > 0 {
                *left -= 1;
                return Ok(dlock_core::Attempt::Busy(
                    dlock_core::Busy::new()
                        .retry_after(Duration::ZERO)
                        .hold_off(Duration::from_millis(100)),
                ));
            }
        }
        self.inner.try_acquire(request).await
    }

    async fn extend(
        &self,
        lease: &dlock_core::Lease,
        ttl: Duration,
    ) -> Result<dlock_core::ExtendOutcome, LockError> {
        self.inner.extend(lease, ttl).await
    }

    async fn release(&self, lease: &dlock_core::Lease) -> Result<dlock_core::ReleaseOutcome, LockError> {
        self.inner.release(lease).await
    }

    async fn abandon(&self, key: &str, owner: &OwnerToken) -> Result<(), LockError> {
        self.inner.abandon(key, owner).await
    }

    async fn subscribe(&self, key: &str) -> Result<dlock_core::ReleaseEvents, LockError> {
        self.inner.subscribe(key).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_hold_off_keeps_the_waiter_away_even_with_a_zero_retry_hint() {
    let backend = Arc::new(SplitVotes {
        inner: MemoryBackend::new(),
        hold_offs_left: std::sync::Mutex::new(2),
        attempts: std::sync::Mutex::new(Vec::new()),
    });
    let locker = Locker::from_arc(Arc::clone(&backend) as Arc<dyn dlock_core::LockBackend>);
    let guard = locker
        .lock("split")
        .wait(Duration::from_secs(5))
        .await
        .expect("granted after two split votes");
    let attempts = backend.attempts.lock().expect("attempts").clone();
    assert_eq!(attempts.len(), 3, "two held-off attempts, then the grant");
    for pair in attempts.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(100),
            "retried after {:?}, before the hold-off ended",
            pair[1] - pair[0]
        );
    }
    guard.release().await.expect("release");
}

/// Renewals run in one task per locker; a locker that outlives the runtime
/// its first guard was renewed on still renews guards on the next runtime.
#[test]
fn a_locker_keeps_renewing_on_a_second_runtime() {
    let (backend, locker) = setup();
    // Holds `key` (ttl 3 s) for 10 s on a runtime of its own; returns
    // whether it was still held, how many operations the backend saw, and
    // how the release went.
    let hold_on_a_new_runtime = |key: &'static str| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime")
            .block_on(async {
                let guard = locker
                    .lock(key)
                    .ttl(Duration::from_secs(3))
                    .await
                    .expect("acquire");
                let before = backend.operations();
                sleep(Duration::from_secs(10)).await;
                let (held, operations) = (guard.is_held(), backend.operations() - before);
                (held, operations, guard.release().await)
            })
    };
    let (held, _, released) = hold_on_a_new_runtime("first");
    assert!(held, "renewed on the first runtime");
    released.expect("release");
    // The first runtime, and the renewal task on it, are gone.
    let (held, operations, released) = hold_on_a_new_runtime("second");
    assert!(operations >= 9, "renewals on the second runtime");
    assert!(held, "renewed on the second runtime");
    released.expect("release");
}

/// A released guard leaves the schedule: no renewal is sent for it later.
#[tokio::test(start_paused = true)]
async fn a_released_guard_is_not_renewed() {
    let (backend, locker) = setup();
    let guard = locker
        .lock("done")
        .ttl(Duration::from_secs(3))
        .await
        .expect("acquire");
    guard.release().await.expect("release");
    let before = backend.operations();
    sleep(Duration::from_secs(10)).await;
    assert_eq!(backend.operations(), before, "no operation after the release");
}
