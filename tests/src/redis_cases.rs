//! Checks every Redis deployment (single, Cluster, Sentinel) runs, beside
//! the conformance suite: mutual exclusion under load, and keys that hold
//! what dlock did not put there. [`redis_suite!`](crate::redis_suite) makes
//! one test per check for a deployment.

use dlock_core::{LockError, Locker};
use dlock_testkit::conformance::unique_key;
use dlock_testkit::{CheckerConfig, check_mutual_exclusion};

use crate::RedisHarness;

/// Generates, for one deployment, a `#[tokio::test]` per conformance check
/// and per check in this module.
#[macro_export]
macro_rules! redis_suite {
    ($deployment:expr) => {
        dlock_testkit::conformance_tests!(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            $crate::RedisHarness::new($deployment).await
        );

        $crate::redis_suite!(@cases $deployment;
            mutual_exclusion_16_clients_200_acquisitions,
            a_key_of_another_type_is_reported_and_left_alone,
            a_foreign_string_is_reported_and_left_alone,
            a_broken_fencing_counter_is_reported_and_takes_nothing,
            a_wrong_password_is_refused_and_never_shown,
        );
    };
    (@cases $deployment:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::redis_cases::$case(&$crate::RedisHarness::new($deployment).await).await;
            }
        )+
    };
}

/// 16 clients (each its own backend and connections) × 200 acquisitions of
/// one key: no overlapping critical sections, tokens strictly increasing.
pub async fn mutual_exclusion_16_clients_200_acquisitions(harness: &RedisHarness) {
    let mut lockers = Vec::new();
    for _ in 0..16 {
        lockers.push(Locker::new(
            harness.deployment().connect().await.expect("connect"),
        ));
    }
    let key = unique_key("checker");
    let report = check_mutual_exclusion(&lockers, &key, CheckerConfig::default().load(16, 200)).await;
    report.assert_clean();
    assert_eq!(report.acquired, 3200);
    assert_eq!(report.history.accepted, 3200);
}

/// A list at the lock key: `ForeignValue` naming the key; the list stays.
pub async fn a_key_of_another_type_is_reported_and_left_alone(harness: &RedisHarness) {
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

/// A string dlock did not write: `ForeignValue` (also when waiting), kept.
pub async fn a_foreign_string_is_reported_and_left_alone(harness: &RedisHarness) {
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
        .wait(std::time::Duration::from_secs(1))
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

/// A fencing counter that is not a number: `ForeignValue`, and no lock key
/// is left behind (the script undoes its SET).
pub async fn a_broken_fencing_counter_is_reported_and_takes_nothing(harness: &RedisHarness) {
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

/// An ACL user limited to `dlock:*` keys and channels can lock; the same
/// user with a wrong password gets `Unavailable` saying authentication
/// failed, and the password shows nowhere.
pub async fn a_wrong_password_is_refused_and_never_shown(harness: &RedisHarness) {
    let user = format!("dlock_test_{}", fastrand::u64(..));
    let mut nodes = harness.deployment().acl_targets().await;
    for node in &mut nodes {
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("on")
            .arg(">right-password")
            .arg("~dlock:*")
            .arg("&dlock:*")
            .arg("+@all")
            .query_async(node)
            .await
            .expect("ACL SETUSER");
    }
    let error = harness
        .deployment()
        .builder_as(&user, "wrong-password")
        .connect()
        .await
        .expect_err("wrong password");
    let shown = format!("{error} {error:?}");
    assert!(matches!(error, LockError::Unavailable { .. }), "{error:?}");
    assert!(shown.contains("authentication failed"), "{shown}");
    assert!(!shown.contains("wrong-password"), "the password leaked: {shown}");

    let backend = harness
        .deployment()
        .builder_as(&user, "right-password")
        .connect()
        .await
        .expect("right password");
    let guard = Locker::new(backend)
        .try_lock(unique_key("acl"))
        .await
        .expect("an ACL user limited to dlock:* can lock");
    guard.release().await.expect("release");
    for node in &mut nodes {
        let _: () = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&user)
            .query_async(node)
            .await
            .expect("ACL DELUSER");
    }
}
