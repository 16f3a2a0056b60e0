//! `RedisBackend` on a real Redis Cluster (3 masters + 3 replicas) started
//! by `cargo xtask integration`.

use std::time::{Duration, Instant};

use dlock_core::LockError;
use dlock_redis::RedisBackend;
use dlock_tests::RedisDeployment;

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
    let port = dlock_servers::free_port().expect("port");
    let started = Instant::now();
    let outcome = RedisBackend::cluster_builder([format!("redis://127.0.0.1:{port}")])
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await;
    assert!(
        matches!(outcome, Err(LockError::Unavailable { .. })),
        "{outcome:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}
