//! `RedisBackend` through Redis Sentinel (1 master, 1 replica, 3 sentinels)
//! started by `cargo xtask integration`.

use std::time::Duration;

use dlock_core::LockError;
use dlock_redis::RedisBackend;
use dlock_tests::{RedisDeployment, assert_unavailable_within, unused_address};

dlock_tests::redis_suite!(RedisDeployment::sentinel_from_env());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_master_name_is_unavailable_and_named() {
    let RedisDeployment::Sentinel { sentinels, .. } = RedisDeployment::sentinel_from_env() else {
        unreachable!("sentinel_from_env gives a Sentinel deployment");
    };
    let error = RedisBackend::connect_sentinel(&sentinels, "no-such-master")
        .await
        .expect_err("unknown master");
    assert!(matches!(error, LockError::Unavailable { .. }), "{error:?}");
    assert!(error.to_string().contains("no-such-master"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sentinel_settings_are_invalid_options() {
    let empty: [&str; 0] = [];
    assert!(matches!(
        RedisBackend::connect_sentinel(empty, "m").await,
        Err(LockError::InvalidOptions { .. })
    ));
    assert!(matches!(
        RedisBackend::connect_sentinel(["redis://127.0.0.1:26379"], "").await,
        Err(LockError::InvalidOptions { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_sentinels_are_unavailable_within_the_timeout() {
    let connecting = RedisBackend::sentinel_builder([format!("redis://{}", unused_address())], "m")
        .connect_timeout(Duration::from_secs(1))
        .connect();
    assert_unavailable_within(Duration::from_secs(3), connecting).await;
}
