//! `RedisBackend` on a real single redis-server started by `cargo xtask integration`.

use std::time::{Duration, Instant};

use dlock_core::LockError;
use dlock_redis::RedisBackend;
use dlock_tests::{RedisDeployment, redis_url};

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
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port();
    let started = Instant::now();
    let outcome = RedisBackend::builder(&format!("redis://127.0.0.1:{port}/0"))
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
