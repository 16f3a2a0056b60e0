//! `RedisBackend` on a real Redis Cluster (3 masters + 3 replicas) started
//! by `cargo xtask integration`.

use std::time::Duration;

use dlock_core::LockError;
use dlock_redis::RedisBackend;
use dlock_tests::{RedisDeployment, assert_unavailable_within, unused_address};

dlock_tests::redis_suite!(RedisDeployment::cluster_from_env());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_seed_lists_are_invalid_options() {
    let empty: [&str; 0] = [];
    assert!(matches!(
        RedisBackend::connect_cluster(empty).await,
        Err(LockError::InvalidOptions { .. })
    ));
    match RedisBackend::connect_cluster(["redis://127.0.0.1:7000", "nonsense"]).await {
        Err(LockError::InvalidOptions { reason, .. }) => assert!(reason.contains("redis://"), "{reason}"),
        other => panic!("expected InvalidOptions, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_seeds_are_unavailable_within_the_timeout() {
    let connecting = RedisBackend::cluster_builder([format!("redis://{}", unused_address())])
        .connect_timeout(Duration::from_secs(1))
        .connect();
    assert_unavailable_within(Duration::from_secs(3), connecting).await;
}
