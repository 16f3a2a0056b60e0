//! `RedlockBackend` over 5 independent redis-servers started by
//! `cargo xtask integration`.

use std::time::Duration;

use dlock_core::{FencingToken, LockError, Locker};
use dlock_redis::RedlockBackend;
use dlock_testkit::conformance::unique_key;
use dlock_testkit::{CheckerConfig, check_mutual_exclusion};
use dlock_tests::{RedlockHarness, redlock_urls};

dlock_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    RedlockHarness::from_env().await
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_16_clients_200_acquisitions() {
    let urls = redlock_urls();
    let mut lockers = Vec::new();
    for _ in 0..16 {
        lockers.push(Locker::new(
            RedlockBackend::connect(&urls).await.expect("connect"),
        ));
    }
    let key = unique_key("redlock-checker");
    let report = check_mutual_exclusion(&lockers, &key, CheckerConfig::default().load(16, 200)).await;
    report.assert_clean();
    assert_eq!(report.acquired, 3200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_held_by_a_majority_and_released_everywhere() {
    let harness = RedlockHarness::from_env().await;
    let backend = RedlockBackend::connect(harness.urls()).await.expect("connect");
    assert_eq!((backend.node_count(), backend.quorum()), (5, 3));
    let key = unique_key("redlock-majority");
    let guard = Locker::new(backend).try_lock(&key).await.expect("lock");
    assert!(harness.holders(&key).await >= 3);
    guard.release().await.expect("release");
    assert_eq!(harness.holders(&key).await, 0);
}

/// Sets node `index`'s counter for `key`, or makes it busy (held by a
/// stranger for a minute) or free.
async fn arrange(harness: &RedlockHarness, index: usize, command: &[&str]) {
    let mut node = harness.nodes()[index].clone();
    let _: redis::Value = redis::cmd(command[0])
        .arg(&command[1..])
        .query_async(&mut node)
        .await
        .expect("arrange a node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_rise_when_node_counters_diverge() {
    let harness = RedlockHarness::from_env().await;
    let locker = Locker::new(RedlockBackend::connect(harness.urls()).await.expect("connect"));
    let key = unique_key("redlock-diverge");
    let (lock_key, fence_key) = (harness.names().lock_key(&key), harness.names().fence_key(&key));
    let stranger = "f".repeat(32);
    // Nodes 0 and 1 missed four grants (they were away); 2, 3, 4 are at 5.
    for (index, counter) in [(0, "1"), (1, "1"), (2, "5"), (3, "5"), (4, "5")] {
        arrange(&harness, index, &["SET", &fence_key, counter]).await;
    }
    let busy = ["SET", lock_key.as_str(), stranger.as_str(), "PX", "60000"];
    // First grant from {0, 1, 2}: counters 2, 2, 6.
    for index in [3, 4] {
        arrange(&harness, index, &busy).await;
    }
    let first = locker.try_lock(&key).await.expect("granted by 0, 1, 2");
    assert_eq!(
        first.fencing_token().get(),
        6,
        "the highest counter of the granting majority"
    );
    first.release().await.expect("release");
    // Second grant from {0, 1, 3}, without node 2 that alone had 6: plain
    // per-node counters would give 3, 3, 6, a repeated token.
    for index in [3, 4] {
        arrange(&harness, index, &["DEL", &lock_key]).await;
    }
    for index in [2, 4] {
        arrange(&harness, index, &busy).await;
    }
    let second = locker.try_lock(&key).await.expect("granted by 0, 1, 3");
    assert!(
        second.fencing_token() > FencingToken::new(6),
        "token {:?} after 6",
        second.fencing_token()
    );
    second.release().await.expect("release");
    for index in [2, 4] {
        arrange(&harness, index, &["DEL", &lock_key]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_invalid_options() {
    let urls = redlock_urls();
    let empty: [&str; 0] = [];
    for outcome in [
        RedlockBackend::connect(empty).await,
        RedlockBackend::connect([&urls[0], &urls[0]]).await,
        RedlockBackend::builder(&urls).drift_factor(0.9).connect().await,
        RedlockBackend::builder(&urls)
            .node_timeout(Duration::ZERO)
            .connect()
            .await,
        RedlockBackend::connect(["redis://127.0.0.1:1", "not a url"]).await,
    ] {
        assert!(
            matches!(outcome, Err(LockError::InvalidOptions { .. })),
            "{outcome:?}"
        );
    }
}

/// Two URLs that spell one server differently (another database number)
/// are one vote, not two: refused at connect, whatever the text says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_server_under_two_urls_is_refused() {
    let urls = redlock_urls();
    let same_server = format!("{}/1", urls[0].trim_end_matches("/0"));
    let listed = [urls[0].clone(), urls[1].clone(), same_server.clone()];
    match RedlockBackend::connect(&listed).await {
        Err(LockError::InvalidOptions { reason, .. }) => {
            assert!(reason.contains("same Redis server"), "{reason}");
        }
        other => panic!("{listed:?}: expected InvalidOptions, got {other:?}"),
    }
}
