//! `EtcdBackend` on a real 3-member etcd cluster started by `cargo xtask integration`.

use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_etcd::EtcdBackend;
use dlock_testkit::conformance::unique_key;
use dlock_testkit::{CheckerConfig, check_mutual_exclusion};
use dlock_tests::{EtcdHarness, assert_unavailable_within, etcd_endpoints, unused_address};

dlock_testkit::conformance_tests!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    EtcdHarness::from_env().await
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_exclusion_16_clients_200_acquisitions() {
    let endpoints = etcd_endpoints();
    let mut lockers = Vec::new();
    for _ in 0..16 {
        lockers.push(Locker::new(
            EtcdBackend::connect(&endpoints).await.expect("connect"),
        ));
    }
    let key = unique_key("etcd-checker");
    let report = check_mutual_exclusion(&lockers, &key, CheckerConfig::default().load(16, 200)).await;
    report.assert_clean();
    assert_eq!(report.acquired, 3200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_locks_on_one_session_exclude_each_other() {
    let locker = Locker::new(EtcdBackend::connect(etcd_endpoints()).await.expect("connect"));
    let key = unique_key("etcd-same-session");
    let first = locker.lock(&key).await.expect("first");
    assert!(matches!(
        locker.try_lock(&key).await,
        Err(LockError::Contended { .. })
    ));
    first.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_lease_is_revoked_learns_it_within_a_second() {
    let harness = EtcdHarness::from_env().await;
    let locker = Locker::new(EtcdBackend::connect(harness.endpoints()).await.expect("connect"));
    let key = unique_key("etcd-revoked");
    let guard = locker
        .lock(&key)
        .ttl(Duration::from_secs(30))
        .await
        .expect("lock");
    let leases = harness.admin().leases().await.expect("list leases");
    let mut admin = harness.admin();
    // Revoke the lease under our waiter key, found through the key itself.
    let (waiter, _) = harness.queue(&key).await.into_iter().next().expect("our key");
    let found = admin.get(waiter, None).await.expect("get our key");
    let lease = found.kvs()[0].lease();
    assert!(leases.leases().iter().any(|status| status.id() == lease));
    let revoked_at = tokio::time::Instant::now();
    admin.lease_revoke(lease).await.expect("revoke");
    tokio::time::timeout(Duration::from_secs(1), guard.lost())
        .await
        .expect("the guard learns of the revoked lease within a second");
    assert!(!guard.is_held());
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_endpoints_are_reported() {
    let empty: [&str; 0] = [];
    assert!(matches!(
        EtcdBackend::connect(empty).await,
        Err(LockError::InvalidOptions { .. })
    ));
    match EtcdBackend::connect(["not a url"]).await {
        Err(LockError::InvalidOptions { reason, .. }) => {
            assert!(reason.contains("http://host:port"), "{reason}")
        }
        other => panic!("expected InvalidOptions, got {other:?}"),
    }
    let connecting = EtcdBackend::builder([format!("http://{}", unused_address())])
        .connect_timeout(Duration::from_secs(1))
        .connect();
    assert_unavailable_within(Duration::from_secs(3), connecting).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_key_vanished_is_never_granted_on_it() {
    // etcd 3.4's own lock service can grant a lock whose key expired while
    // it waited; dlock re-reads its key in the same transaction that finds
    // it first in line.
    let harness = EtcdHarness::from_env().await;
    let holder = Locker::new(
        EtcdBackend::connect(harness.endpoints())
            .await
            .expect("connect holder"),
    );
    let waiter = Locker::new(
        EtcdBackend::connect(harness.endpoints())
            .await
            .expect("connect waiter"),
    );
    let key = unique_key("etcd-vanished-waiter");
    let held = holder.lock(&key).await.expect("holder");
    let waiting = {
        let key = key.clone();
        tokio::spawn(async move { waiter.lock(&key).wait(Duration::from_secs(10)).await })
    };
    // Wait until the waiter is queued, then delete its key from outside (as
    // its lease expiring would).
    let mut queued = Vec::new();
    for _ in 0..200 {
        queued = harness.queue(&key).await;
        if queued.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(queued.len(), 2, "holder and waiter are queued");
    let (vanished, vanished_revision) = queued[1].clone();
    harness
        .admin()
        .delete(vanished, None)
        .await
        .expect("delete the waiter's key");
    held.release().await.expect("release");

    match waiting.await.expect("waiter task") {
        Ok(guard) => {
            // Granted only on a key that exists: a new one, queued after the loss.
            let token = i64::try_from(guard.fencing_token().get()).expect("token");
            assert!(token > vanished_revision, "granted on the vanished key");
            let queue = harness.queue(&key).await;
            assert!(queue.iter().any(|(_, revision)| *revision == token), "{queue:?}");
            guard.release().await.expect("release");
        }
        Err(error) => assert!(matches!(error, LockError::Unavailable { .. }), "{error:?}"),
    }
}
