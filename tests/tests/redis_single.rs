//! `RedisBackend` on a real single redis-server started by `cargo xtask integration`.

use std::time::Duration;

use dlock_core::LockError;
use dlock_redis::RedisBackend;
use dlock_tests::{RedisDeployment, assert_unavailable_within, redis_url, unused_address};

dlock_tests::redis_suite!(RedisDeployment::single_from_env());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_urls_are_invalid_options() {
    for url in [
        "",
        "not a url",
        "http://127.0.0.1:6379",
        "redis://127.0.0.1:notaport",
    ] {
        match RedisBackend::connect(url).await {
            Err(LockError::InvalidOptions { reason, .. }) => assert!(reason.contains("redis://"), "{reason}"),
            other => panic!("{url:?}: expected InvalidOptions, got {other:?}"),
        }
    }
    let bad_prefix = RedisBackend::builder(&redis_url())
        .key_prefix("a{b}")
        .connect()
        .await;
    assert!(matches!(bad_prefix, Err(LockError::InvalidOptions { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_unavailable_within_the_timeout() {
    let url = format!("redis://{}/0", unused_address());
    let connecting = RedisBackend::builder(&url)
        .connect_timeout(Duration::from_secs(1))
        .connect();
    assert_unavailable_within(Duration::from_secs(3), connecting).await;
}
