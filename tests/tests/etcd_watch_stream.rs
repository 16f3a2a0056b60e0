//! A backend's watches (loss signals, waiters' predecessors) share one
//! watch stream, and leave no watcher on the server once they are done.
//! Counted from the members' own metrics; a test binary of its own so that
//! no other test's watches move the counts.

use std::time::Duration;

use dlock_core::Locker;
use dlock_etcd::EtcdBackend;
use dlock_testkit::conformance::unique_key;
use dlock_tests::{etcd_endpoints, etcd_member_metrics, metric_value};

/// Watch streams opened so far, and watchers alive now, over all members.
async fn watch_counts(endpoints: &[String]) -> (u64, u64) {
    let (mut opened, mut watchers) = (0, 0);
    for endpoint in endpoints {
        let metrics = etcd_member_metrics(endpoint).await;
        opened += metric_value(
            &metrics,
            "grpc_server_started_total{grpc_method=\"Watch\",grpc_service=\"etcdserverpb.Watch\"",
        );
        watchers += metric_value(&metrics, "etcd_debugging_mvcc_watcher_total ");
    }
    (opened, watchers)
}

/// Polls the counts until `done` holds, for up to 5 s.
async fn counts_until(endpoints: &[String], done: impl Fn((u64, u64)) -> bool) -> (u64, u64) {
    let mut counts = watch_counts(endpoints).await;
    for _ in 0..100 {
        if done(counts) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        counts = watch_counts(endpoints).await;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_locks_and_waiters_share_one_watch_stream() {
    let endpoints = etcd_endpoints();
    let locker = Locker::new(EtcdBackend::connect(&endpoints).await.expect("connect"));
    let (opened_before, watchers_before) = watch_counts(&endpoints).await;
    assert_eq!(watchers_before, 0, "no watcher before the test");

    // 40 held locks: each watches its own key for its loss signal.
    let mut guards = Vec::new();
    for index in 0..40 {
        let key = unique_key(&format!("etcd-watch-stream-{index}"));
        guards.push(locker.lock(&key).await.expect("lock"));
    }
    // And a waiter behind the first, watching its predecessor.
    let contended = guards[0].key().to_owned();
    let waiting = {
        let locker = locker.clone();
        tokio::spawn(async move { locker.lock(&contended).wait(Duration::from_secs(10)).await })
    };
    let (opened, watchers) = counts_until(&endpoints, |(_, watchers)| watchers >= 41).await;
    assert_eq!(watchers, 41, "a watcher per held lock and one for the waiter");
    assert_eq!(opened - opened_before, 1, "every watch on one stream");

    for guard in guards {
        guard.release().await.expect("release");
    }
    let next = waiting.await.expect("waiter task").expect("the waiter acquires");
    next.release().await.expect("release");
    // Released locks and the satisfied waiter cancel their watches.
    let (opened, watchers) = counts_until(&endpoints, |(_, watchers)| watchers == 0).await;
    assert_eq!(watchers, 0, "no watcher is left once every lock is released");
    assert_eq!(opened - opened_before, 1, "still the one stream");
}
