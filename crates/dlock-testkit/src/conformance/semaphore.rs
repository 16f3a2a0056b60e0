//! Checks of the counting semaphore: the limit, one lease per permit, kinds
//! that do not mix, waiting. On a backend without semaphores
//! ([`SuiteConfig::semaphores`](super::SuiteConfig::semaphores) off) each
//! check asserts the typed `Unsupported` answer instead.

use std::time::Duration;

use dlock_core::{LockError, LockGuard, Locker, MAX_PERMITS};
use tokio::time::{Instant, sleep, timeout};

use super::{Harness, LONG_TTL, unique_key, until_nothing_left};

/// On a backend that does not offer semaphores: the request is refused as
/// `Unsupported` and leaves nothing. Returns true when the check must stop.
async fn unsupported_here(harness: &dyn Harness, locker: &Locker, key: &str) -> bool {
    if harness.config().semaphores {
        return false;
    }
    match locker.semaphore(key, 2).try_lock().await {
        Err(LockError::Unsupported { what, .. }) => assert!(what.contains("semaphore"), "{what}"),
        other => panic!("a backend without semaphores must answer Unsupported, got {other:?}"),
    }
    until_nothing_left(harness, key, "a refused semaphore request left state behind").await;
    true
}

/// At most `permits` leases at once: the next `try_lock` is `Contended`;
/// every permit gets a token above every token before it on the key; a
/// released permit can be taken again.
pub async fn semaphore_admits_up_to_its_limit(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("semaphore_admits_up_to_its_limit");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let mut permits: Vec<LockGuard> = Vec::new();
    for _ in 0..3 {
        let other = harness.locker().await;
        let permit = other
            .semaphore(&key, 3)
            .ttl(LONG_TTL)
            .try_lock()
            .await
            .expect("a free permit");
        if let Some(last) = permits.last() {
            assert!(
                permit.fencing_token() > last.fencing_token(),
                "tokens must increase"
            );
        }
        permits.push(permit);
    }
    match locker.semaphore(&key, 3).try_lock().await {
        Err(LockError::Contended { key: reported }) => assert_eq!(reported, key),
        other => panic!("a full semaphore must be Contended, got {other:?}"),
    }
    assert!(permits.iter().all(LockGuard::is_held));
    let highest = permits.iter().map(LockGuard::fencing_token).max();
    permits.remove(1).release().await.expect("release one permit");
    let again = locker
        .semaphore(&key, 3)
        .ttl(LONG_TTL)
        .try_lock()
        .await
        .expect("the released permit is free again");
    assert!(Some(again.fencing_token()) > highest);
    assert!(
        permits.iter().all(LockGuard::is_held),
        "the other permits stay held"
    );
    again.release().await.expect("release");
    for permit in permits {
        permit.release().await.expect("release");
    }
    until_nothing_left(harness, &key, "released permits left state behind").await;
}

/// The limit is stored with the key: another limit while permits are held
/// is `InvalidOptions` naming both; once every permit is gone, a new limit
/// may be used.
pub async fn semaphore_limit_is_kept_with_the_key(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("semaphore_limit_is_kept_with_the_key");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let held = locker.semaphore(&key, 2).ttl(LONG_TTL).await.expect("a permit");
    for other_limit in [1, 3] {
        match locker.semaphore(&key, other_limit).try_lock().await {
            Err(LockError::InvalidOptions {
                reason,
                key: reported,
            }) => {
                assert_eq!(reported.as_deref(), Some(key.as_str()));
                assert!(
                    reason.contains('2') && reason.contains(&other_limit.to_string()),
                    "the message must name both limits: {reason}"
                );
            }
            other => panic!("limit {other_limit} against 2: expected InvalidOptions, got {other:?}"),
        }
        // A waiting request is refused the same way, at once.
        let refused = timeout(
            Duration::from_secs(5),
            locker.semaphore(&key, other_limit).wait(LONG_TTL),
        )
        .await
        .expect("a limit mismatch must not wait");
        assert!(
            matches!(refused, Err(LockError::InvalidOptions { .. })),
            "{refused:?}"
        );
    }
    assert!(held.is_held(), "a refused request leaves the held permit alone");
    held.release().await.expect("release");
    until_nothing_left(harness, &key, "a semaphore with no permits left state behind").await;
    let relimited = locker
        .semaphore(&key, 5)
        .try_lock()
        .await
        .expect("with no permit held, a new limit is accepted");
    relimited.release().await.expect("release");
}

/// A key in use as a mutex is refused as a semaphore and the other way
/// round, with `WrongKind`, and neither lock is disturbed.
pub async fn mutex_and_semaphore_do_not_mix(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("mutex_and_semaphore_do_not_mix");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let mutex = locker.lock(&key).ttl(LONG_TTL).await.expect("the mutex");
    match locker.semaphore(&key, 3).try_lock().await {
        Err(LockError::WrongKind {
            held_as, asked_as, ..
        }) => {
            assert!(
                held_as.contains("mutex") && asked_as.contains("semaphore"),
                "{held_as} / {asked_as}"
            );
        }
        other => panic!("a semaphore on a mutex's key: expected WrongKind, got {other:?}"),
    }
    let waited = timeout(Duration::from_secs(5), locker.semaphore(&key, 3).wait(LONG_TTL))
        .await
        .expect("a kind mismatch must not wait");
    assert!(matches!(waited, Err(LockError::WrongKind { .. })), "{waited:?}");
    assert!(mutex.is_held());
    mutex.release().await.expect("release");
    until_nothing_left(harness, &key, "the mutex left state behind").await;

    let permit = locker.semaphore(&key, 3).ttl(LONG_TTL).await.expect("a permit");
    match locker.lock(&key).try_lock().await {
        Err(LockError::WrongKind {
            held_as, asked_as, ..
        }) => {
            assert!(
                held_as.contains("semaphore") && asked_as.contains("mutex"),
                "{held_as} / {asked_as}"
            );
        }
        other => panic!("a mutex on a semaphore's key: expected WrongKind, got {other:?}"),
    }
    assert!(permit.is_held());
    permit.release().await.expect("release");
    until_nothing_left(harness, &key, "the semaphore left state behind").await;
}

/// 0 permits and more than `MAX_PERMITS` are `InvalidOptions`, before
/// anything reaches the backend.
pub async fn semaphore_bad_limits_are_rejected(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("semaphore_bad_limits_are_rejected");
    for bad in [0, MAX_PERMITS + 1, u32::MAX] {
        match locker.semaphore(&key, bad).try_lock().await {
            Err(LockError::InvalidOptions { reason, .. }) => {
                assert!(reason.contains(&bad.to_string()), "{reason}")
            }
            other => panic!("{bad} permits: expected InvalidOptions, got {other:?}"),
        }
    }
    until_nothing_left(harness, &key, "a refused limit left state behind").await;
}

/// Each permit is its own lease: a holder that stops renewing (a crash)
/// loses its permit when its TTL ends, and only its own: the renewed
/// permit stays held, and the freed one can be taken.
pub async fn semaphore_permits_expire_one_by_one(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("semaphore_permits_expire_one_by_one");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let short = harness.config().short_ttl;
    let crashed = harness.locker().await;
    let lasting = locker
        .semaphore(&key, 2)
        .ttl(short)
        .await
        .expect("a renewed permit");
    let dead = crashed.semaphore(&key, 2).ttl(short).await.expect("a permit");
    let dead_token = dead.fencing_token();
    dead.forget(); // the holder crashes: no release, no renewal
    assert!(matches!(
        locker.semaphore(&key, 2).try_lock().await,
        Err(LockError::Contended { .. })
    ));
    let give_up_at = Instant::now() + short * 4;
    let taken = loop {
        match locker.semaphore(&key, 2).ttl(LONG_TTL).try_lock().await {
            Ok(permit) => break permit,
            Err(LockError::Contended { .. }) if Instant::now() < give_up_at => {
                sleep(short / 10).await;
            }
            other => panic!("the crashed holder's permit must free within its TTL, got {other:?}"),
        }
    };
    assert!(taken.fencing_token() > dead_token);
    assert!(
        lasting.is_held(),
        "the renewed permit must outlive the crashed one"
    );
    taken.release().await.expect("release");
    lasting.release().await.expect("release");
}

/// A waiter on a full semaphore gets the permit a release frees, woken by
/// a notification (within the wake bound), and only one waiter per permit.
pub async fn semaphore_waiter_woken_on_release(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("semaphore_waiter_woken_on_release");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let first = locker.semaphore(&key, 2).ttl(LONG_TTL).await.expect("permit 1");
    let second = locker.semaphore(&key, 2).ttl(LONG_TTL).await.expect("permit 2");
    let mut waiters = Vec::new();
    for _ in 0..2 {
        let waiter = harness.locker().await;
        let key = key.clone();
        waiters.push(tokio::spawn(async move {
            let permit = waiter
                .semaphore(&key, 2)
                .ttl(LONG_TTL)
                .wait(Duration::from_secs(25))
                .await;
            (permit, Instant::now())
        }));
    }
    sleep(Duration::from_millis(300)).await;
    assert!(
        waiters.iter().all(|waiter| !waiter.is_finished()),
        "both must wait"
    );
    let released_at = Instant::now();
    first.release().await.expect("release one permit");
    // Exactly one waiter gets in; the other keeps waiting.
    let bound = harness.config().wake_bound;
    sleep(bound).await;
    let done: Vec<bool> = waiters.iter().map(|waiter| waiter.is_finished()).collect();
    assert_eq!(
        done.iter().filter(|done| **done).count(),
        1,
        "one release admits one waiter: {done:?}"
    );
    let admitted = waiters.remove(done.iter().position(|done| *done).unwrap_or(0));
    let (permit, acquired_at) = admitted.await.expect("waiter task");
    let permit = permit.expect("the waiter gets the freed permit");
    assert!(
        acquired_at - released_at < bound,
        "the waiter took {:?} after the release (bound {bound:?}): not woken by a notification",
        acquired_at - released_at
    );
    assert!(permit.fencing_token() > second.fencing_token());
    second.release().await.expect("release");
    let (last, _) = waiters.remove(0).await.expect("waiter task");
    last.expect("the second waiter gets the next permit")
        .release()
        .await
        .expect("release");
    permit.release().await.expect("release");
    until_nothing_left(harness, &key, "the semaphore left state behind").await;
}

/// A waiter cancelled while the semaphore is full leaves nothing behind.
pub async fn semaphore_cancelled_waiters_leave_nothing(harness: &dyn Harness) {
    let locker = harness.locker().await;
    let key = unique_key("semaphore_cancelled_waiters_leave_nothing");
    if unsupported_here(harness, &locker, &key).await {
        return;
    }
    let permit = locker.semaphore(&key, 1).ttl(LONG_TTL).await.expect("the permit");
    let waiter = harness.locker().await;
    let dropped = timeout(Duration::from_millis(300), waiter.semaphore(&key, 1)).await;
    assert!(dropped.is_err(), "the waiter must still be waiting when dropped");
    permit.release().await.expect("release");
    until_nothing_left(harness, &key, "a cancelled semaphore waiter left state behind").await;
    let again = waiter
        .semaphore(&key, 1)
        .try_lock()
        .await
        .expect("the permit is free");
    again.release().await.expect("release");
}
