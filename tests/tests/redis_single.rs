//! `RedisBackend` on a real single redis-server started by `cargo xtask integration`.

use std::time::{Duration, Instant};

use dlock_core::{LockError, Locker};
use dlock_redis::RedisBackend;
use dlock_testkit::conformance::unique_key;
use dlock_testkit::{CheckerConfig, check_mutual_exclusion};
use dlock_tests::{RedisHarness, redis_url};

dlock_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    RedisHarness::from_env().await
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_16_clients_200_acquisitions() {
    let url = redis_url();
    let mut lockers = Vec::new();
    for _ in 0..16 {
        lockers.push(Locker::new(RedisBackend::connect(&url).await.expect("connect")));
    }
    let key = unique_key("checker");
    let report = check_mutual_exclusion(&lockers, &key, CheckerConfig::default().load(16, 200)).await;
    report.assert_clean();
    assert_eq!(report.acquired, 3200);
    assert_eq!(report.history.accepted, 3200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_is_reported_and_left_alone() {
    let harness = RedisHarness::from_env().await;
    let locker = Locker::new(harness.backend().clone());
    let key = unique_key("wrongtype");
    let lock_key = harness.backend().lock_key(&key);
    let mut admin = harness.admin();
    let _: i64 = redis::cmd("LPUSH")
        .arg(&lock_key)
        .arg("precious")
        .query_async(&mut admin)
        .await
        .expect("LPUSH");
    match locker.try_lock(&key).await {
        Err(LockError::ForeignValue { key: reported, .. }) => assert_eq!(reported, key),
        other => panic!("expected ForeignValue, got {other:?}"),
    }
    let kept: Vec<String> = redis::cmd("LRANGE")
        .arg(&lock_key)
        .arg(0)
        .arg(-1)
        .query_async(&mut admin)
        .await
        .expect("LRANGE");
    assert_eq!(kept, vec!["precious".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_string_is_reported_and_left_alone() {
    let harness = RedisHarness::from_env().await;
    let locker = Locker::new(harness.backend().clone());
    let key = unique_key("foreign");
    let lock_key = harness.backend().lock_key(&key);
    let mut admin = harness.admin();
    let _: () = redis::cmd("SET")
        .arg(&lock_key)
        .arg("not-a-dlock-owner")
        .query_async(&mut admin)
        .await
        .expect("SET");
    let error = locker
        .lock(&key)
        .wait(Duration::from_secs(1))
        .await
        .expect_err("foreign value");
    assert!(matches!(error, LockError::ForeignValue { .. }), "{error:?}");
    assert!(error.to_string().contains(&key), "{error}");
    let kept: String = redis::cmd("GET")
        .arg(&lock_key)
        .query_async(&mut admin)
        .await
        .expect("GET");
    assert_eq!(kept, "not-a-dlock-owner");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_fencing_counter_is_reported_and_takes_nothing() {
    let harness = RedisHarness::from_env().await;
    let locker = Locker::new(harness.backend().clone());
    let key = unique_key("fence");
    let mut admin = harness.admin();
    let _: () = redis::cmd("SET")
        .arg(harness.backend().fence_key(&key))
        .arg("abc")
        .query_async(&mut admin)
        .await
        .expect("SET");
    assert!(matches!(
        locker.try_lock(&key).await,
        Err(LockError::ForeignValue { .. })
    ));
    let exists: i64 = redis::cmd("EXISTS")
        .arg(harness.backend().lock_key(&key))
        .query_async(&mut admin)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "no half-taken lock may stay behind");
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_and_never_shown() {
    let harness = RedisHarness::from_env().await;
    let mut admin = harness.admin();
    let user = format!("dlock_test_{}", std::process::id());
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">right-password")
        .arg("~dlock:*")
        .arg("&dlock:*")
        .arg("+@all")
        .query_async(&mut admin)
        .await
        .expect("ACL SETUSER");
    let address = harness.url().trim_start_matches("redis://");
    let wrong = format!("redis://{user}:wrong-password@{address}");
    let error = RedisBackend::connect(&wrong).await.expect_err("wrong password");
    let shown = format!("{error} {error:?}");
    assert!(matches!(error, LockError::Unavailable { .. }), "{error:?}");
    assert!(shown.contains("authentication failed"), "{shown}");
    assert!(!shown.contains("wrong-password"), "the password leaked: {shown}");

    let right = format!("redis://{user}:right-password@{address}");
    let locker = Locker::new(RedisBackend::connect(&right).await.expect("right password"));
    let guard = locker
        .try_lock(unique_key("acl"))
        .await
        .expect("an ACL user limited to dlock:* can lock");
    guard.release().await.expect("release");
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut admin)
        .await
        .expect("ACL DELUSER");
}
