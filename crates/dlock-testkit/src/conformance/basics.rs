//! Checks of the basic calls: acquire, release, try, wait, bad input,
//! operator views.

use std::time::Duration;

use dlock_core::{LockError, MAX_KEY_LEN};
use tokio::time::{Instant, timeout};

use super::{Harness, LONG_TTL, unique_key, until_nothing_left};

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
