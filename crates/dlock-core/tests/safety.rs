//! The core's side of the safety review: a guard never believes in a lease
//! longer than the server keeps it, whatever the renewal driver does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dlock_core::{
    AcquireRequest, Attempt, ExtendOutcome, Lease, LockBackend, LockError, Locker, OwnerToken, ReleaseEvents,
    ReleaseOutcome,
};
use dlock_testkit::MemoryBackend;
use tokio::time::{Instant, sleep, timeout};

fn setup() -> (MemoryBackend, Locker) {
    let backend = MemoryBackend::new();
    let locker = Locker::new(backend.clone());
    (backend, locker)
}

/// Without auto-renewal, a shortened lease ends the guard when it ends,
/// not when the old, longer one would have.
#[tokio::test(start_paused = true)]
async fn a_shortened_lease_without_renewal_is_lost_when_it_ends() {
    let (backend, locker) = setup();
    let guard = locker
        .lock("shortened")
        .ttl(Duration::from_secs(30))
        .auto_renew(false)
        .await
        .expect("acquire");
    let extended_at = Instant::now();
    guard.extend(Duration::from_secs(2)).await.expect("extend");
    timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost() resolves when the shortened lease ends, not at the old 30 s");
    assert!(
        extended_at.elapsed() <= Duration::from_secs(2),
        "lost after {:?}",
        extended_at.elapsed()
    );
    assert!(!guard.is_held());
    // The server side agrees: the key is free for the next client.
    sleep(Duration::from_millis(100)).await;
    let next = Locker::new(backend.clone())
        .try_lock("shortened")
        .await
        .expect("the key is free once the shortened lease ended");
    assert!(next.fencing_token() > guard.fencing_token());
}

/// With auto-renewal, renewals follow the shortened lease: the lock stays
/// held long past the 2 s it was extended to.
#[tokio::test(start_paused = true)]
async fn a_shortened_lease_with_renewal_stays_held() {
    let (backend, locker) = setup();
    let guard = locker
        .lock("shortened-renewed")
        .ttl(Duration::from_secs(30))
        .await
        .expect("acquire");
    guard.extend(Duration::from_secs(2)).await.expect("extend");
    sleep(Duration::from_secs(20)).await;
    assert!(guard.is_held(), "renewals must follow the 2 s lease");
    assert_eq!(
        backend.holder_token("shortened-renewed"),
        Some(guard.fencing_token())
    );
    let other = Locker::new(backend.clone()).try_lock("shortened-renewed").await;
    assert!(matches!(other, Err(LockError::Contended { .. })), "{other:?}");
    guard.release().await.expect("release");
}

/// Runs a current-thread runtime on a thread of its own: it takes a lock on
/// `locker` (so that its renewal driver starts there), hands the guard over,
/// then blocks its thread for `stall`.
fn stalled_runtime(locker: Locker, key: &'static str, stall: std::time::Duration) -> dlock_core::LockGuard {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let guard = locker
                .lock(key)
                .ttl(Duration::from_millis(300))
                .await
                .expect("acquire on the stalling runtime");
            sender.send(guard).expect("hand the guard over");
            // A blocking call on the runtime's only thread: nothing on this
            // runtime runs until it returns.
            std::thread::sleep(stall);
        });
    });
    receiver.recv().expect("the guard from the stalling runtime")
}

/// The loss signal does not depend on the runtime the renewals run on:
/// when that runtime stalls, `lost()` awaited elsewhere still resolves by
/// the lease's validity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_resolves_by_the_validity_when_the_renewing_runtime_stalls() {
    let (_backend, locker) = setup();
    let guard = stalled_runtime(locker, "stalled-loss", Duration::from_secs(3));
    let began = std::time::Instant::now();
    timeout(Duration::from_secs(1), guard.lost())
        .await
        .expect("lost() must resolve by the 300 ms validity, not when the stalled runtime wakes");
    assert!(
        began.elapsed() < Duration::from_millis(500),
        "{:?}",
        began.elapsed()
    );
    assert!(!guard.is_held());
    guard.forget();
}

/// A locker shared by two runtimes renews each runtime's guards on that
/// runtime: the one that took the first lock stalling does not stop the
/// other's renewals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_runtime_does_not_stop_renewals_on_another() {
    let (backend, locker) = setup();
    let stalled = stalled_runtime(locker.clone(), "stalled-first", Duration::from_secs(3));
    let guard = locker
        .lock("healthy")
        .ttl(Duration::from_millis(300))
        .await
        .expect("acquire");
    sleep(Duration::from_millis(1500)).await;
    assert!(guard.is_held(), "the healthy runtime's guard must be renewed");
    assert_eq!(backend.holder_token("healthy"), Some(guard.fencing_token()));
    guard.release().await.expect("release");
    stalled.forget();
}

/// The memory backend with its grants changed, to play a server or a
/// backend the memory one is not.
struct Decorated {
    inner: MemoryBackend,
    change: Change,
}

enum Change {
    /// The first `answers` grants come back only after `delay`, as from an
    /// overloaded server.
    SlowGrants { answers: AtomicUsize, delay: Duration },
    /// Each grant carries a lease handle whose drops are counted, and a
    /// loss signal, as the etcd backend's do.
    TrackedHandles(Arc<AtomicUsize>),
}

/// Counts the drops of the lease handles it is put in.
struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[dlock_core::async_trait]
impl LockBackend for Decorated {
    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt, LockError> {
        let answer = self.inner.try_acquire(request).await;
        match &self.change {
            Change::SlowGrants { answers, delay } => {
                let slow = answers
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1))
                    .is_ok();
                if slow {
                    sleep(*delay).await;
                }
                answer
            }
            Change::TrackedHandles(dropped) => Ok(match answer? {
                Attempt::Acquired(grant) => Attempt::Acquired(
                    grant
                        .with_handle(DropCount(Arc::clone(dropped)))
                        .with_loss_signal(std::future::pending()),
                ),
                busy => busy,
            }),
        }
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<ExtendOutcome, LockError> {
        self.inner.extend(lease, ttl).await
    }

    async fn release(&self, lease: &Lease) -> Result<ReleaseOutcome, LockError> {
        self.inner.release(lease).await
    }

    async fn abandon(&self, key: &str, owner: &OwnerToken) -> Result<(), LockError> {
        self.inner.abandon(key, owner).await
    }

    async fn subscribe(&self, key: &str) -> Result<ReleaseEvents, LockError> {
        self.inner.subscribe(key).await
    }
}

fn slow_grants(slow_answers: usize) -> (MemoryBackend, Locker) {
    let inner = MemoryBackend::new();
    let backend = Decorated {
        inner: inner.clone(),
        change: Change::SlowGrants {
            answers: AtomicUsize::new(slow_answers),
            delay: Duration::from_secs(2),
        },
    };
    (inner, Locker::from_arc(Arc::new(backend)))
}

/// A grant that arrives after its lease was over is no grant: a single
/// attempt fails (and gives the key back), it never returns a guard born
/// lost.
#[tokio::test(start_paused = true)]
async fn a_grant_with_no_validity_left_is_not_a_guard() {
    let (inner, locker) = slow_grants(1);
    let attempt = locker.lock("late").ttl(Duration::from_secs(1)).try_lock().await;
    match attempt {
        Err(LockError::Unavailable { key, message, .. }) => {
            assert_eq!(key.as_deref(), Some("late"));
            assert!(message.contains("granted"), "{message}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Nothing of the late grant stays behind past the clean-up.
    sleep(Duration::from_millis(10)).await;
    assert!(!inner.is_locked("late"), "the late grant must be given back");
}

/// A waiting request treats a late grant as a failed attempt and tries
/// again; the guard it returns is held.
#[tokio::test(start_paused = true)]
async fn a_waiting_request_retries_after_a_late_grant() {
    let (inner, locker) = slow_grants(1);
    let guard = locker
        .lock("late-wait")
        .ttl(Duration::from_secs(1))
        .wait(Duration::from_secs(10))
        .await
        .expect("granted on the next attempt");
    assert!(guard.is_held());
    assert_eq!(inner.holder_token("late-wait"), Some(guard.fencing_token()));
    guard.release().await.expect("release");
}

/// A process can wait for what its locker gives back in the background
/// (a dropped guard, a cancelled request) before it exits.
#[tokio::test(start_paused = true)]
async fn wait_for_cleanup_waits_for_background_releases() {
    let (backend, locker) = setup();
    let dropped = locker.try_lock("dropped").await.expect("lock");
    let waiting = locker.try_lock("waited-for").await.expect("lock");
    backend.set_latency(Duration::from_secs(1));
    drop(dropped);
    let cancelled = timeout(
        Duration::from_millis(10),
        locker.lock("waited-for").wait(Duration::from_secs(60)),
    )
    .await;
    assert!(cancelled.is_err(), "still waiting when cancelled");
    let began = Instant::now();
    locker.wait_for_cleanup().await;
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "returned before the slow release"
    );
    assert!(!backend.is_locked("dropped"), "the dropped guard's release ran");
    backend.set_latency(Duration::ZERO);
    assert_eq!(backend.holder_token("waited-for"), Some(waiting.fencing_token()));
    waiting.release().await.expect("release");
}

/// A backend may keep in a lease's handle what a later acquisition reuses
/// (the etcd backend: its waiter key's name), so the handle must be gone
/// when `release` returns, not when the runtime gets round to dropping the
/// aborted loss-watch task.
#[tokio::test]
async fn the_lease_handle_is_dropped_when_release_returns() {
    let handles_dropped = Arc::new(AtomicUsize::new(0));
    let locker = Locker::new(Decorated {
        inner: MemoryBackend::new(),
        change: Change::TrackedHandles(Arc::clone(&handles_dropped)),
    });
    for round in 1..=3 {
        let guard = locker.lock("handles").await.expect("lock");
        guard.release().await.expect("release");
        assert_eq!(handles_dropped.load(Ordering::SeqCst), round, "round {round}");
    }
}
