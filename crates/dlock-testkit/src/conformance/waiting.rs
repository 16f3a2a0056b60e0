//! Checks of waiting: wake-ups on release, cancelled waiters, order.

use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};

use super::{Harness, LONG_TTL, unique_key, until_nothing_left};

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
