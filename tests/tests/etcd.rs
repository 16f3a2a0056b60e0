//! `EtcdBackend` on a real 3-member etcd cluster started by `cargo xtask integration`.

use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_etcd::EtcdBackend;
use dlock_testkit::conformance::unique_key;
use dlock_testkit::{
    CheckerConfig, check_election, check_mutual_exclusion, check_read_write, check_semaphore,
};
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
async fn semaphore_16_clients_on_4_permits() {
    let endpoints = etcd_endpoints();
    let mut lockers = Vec::new();
    for _ in 0..16 {
        lockers.push(Locker::new(
            EtcdBackend::connect(&endpoints).await.expect("connect"),
        ));
    }
    let key = unique_key("etcd-semaphore-checker");
    let config = CheckerConfig::default()
        .load(16, 10)
        .hold(std::time::Duration::from_millis(30));
    let report = check_semaphore(&lockers, &key, 4, config).await;
    report.assert_clean();
    assert_eq!(report.acquired, 160);
    assert_eq!(
        report.most_inside, 4,
        "16 clients must fill the 4 permits: {report:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_write_16_clients_90_percent_reads() {
    let endpoints = etcd_endpoints();
    let mut lockers = Vec::new();
    for _ in 0..16 {
        lockers.push(Locker::new(
            EtcdBackend::connect(&endpoints).await.expect("connect"),
        ));
    }
    let key = unique_key("etcd-rw-checker");
    let config = CheckerConfig::default()
        .load(16, 10)
        .hold(std::time::Duration::from_millis(10));
    let report = check_read_write(&lockers, &key, config).await;
    report.assert_clean();
    assert_eq!(report.reads + report.writes, 160);
    assert!(report.most_readers_inside > 1, "readers must share: {report:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_8_candidates_lead_in_turn() {
    let endpoints = etcd_endpoints();
    let mut lockers = Vec::new();
    for _ in 0..8 {
        lockers.push(Locker::new(
            EtcdBackend::connect(&endpoints).await.expect("connect"),
        ));
    }
    let key = unique_key("etcd-election-checker");
    let config = CheckerConfig::default().load(8, 5).hold(Duration::from_millis(3));
    let report = check_election(&lockers, &key, config).await;
    report.assert_clean();
    assert_eq!(report.terms, 40);
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
    let queued = harness.queue_of_length(&key, 2).await;
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

/// The name of the only waiter key queued for `key` (the holder's).
async fn holder_name(harness: &EtcdHarness, key: &str) -> String {
    let queue = harness.queue(key).await;
    assert_eq!(queue.len(), 1, "one key queued: {queue:?}");
    queue[0].0.clone()
}

/// Locks and releases `key` until its waiter key has `name`, for up to 3 s;
/// whether it did.
async fn comes_back_to(harness: &EtcdHarness, locker: &Locker, key: &str, name: &str) -> bool {
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        let guard = locker.lock(key).await.expect("lock");
        let current = holder_name(harness, key).await;
        guard.release().await.expect("release");
        if current == name {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiter_key_names_are_reused() {
    // etcd keeps deleted names in its index until compaction, and the
    // queue read walks them: a new name per acquisition would slow every
    // acquisition of a busy key down.
    let harness = EtcdHarness::from_env().await;
    let locker = Locker::new(EtcdBackend::connect(harness.endpoints()).await.expect("connect"));
    let key = unique_key("etcd-name-reuse");
    let mut names = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let guard = locker.lock(&key).await.expect("lock");
        names.insert(holder_name(&harness, &key).await);
        guard.release().await.expect("release");
    }
    assert_eq!(names.len(), 1, "{names:?}");

    // Two acquisitions of one backend at once get two names; the first is
    // taken again afterwards.
    let first = locker.lock(&key).await.expect("first");
    let waiting = {
        let (locker, key) = (locker.clone(), key.clone());
        tokio::spawn(async move { locker.lock(&key).wait(Duration::from_secs(5)).await })
    };
    let queued = harness.queue_of_length(&key, 2).await;
    assert_ne!(queued[0].0, queued[1].0);
    first.release().await.expect("release first");
    let second = waiting.await.expect("waiter task").expect("second");
    second.release().await.expect("release second");
    let reused = names.pop_first().expect("one name");
    assert!(comes_back_to(&harness, &locker, &key, &reused).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_lock_keeps_its_name_until_its_key_is_gone() {
    let harness = EtcdHarness::from_env().await;
    let locker = Locker::new(EtcdBackend::connect(harness.endpoints()).await.expect("connect"));
    let key = unique_key("etcd-forgotten-name");
    let forgotten = locker
        .lock(&key)
        .ttl(Duration::from_secs(2))
        .auto_renew(false)
        .await
        .expect("lock");
    let first_name = holder_name(&harness, &key).await;
    forgotten.forget();
    // While the forgotten key lives, the next acquisition queues under
    // another name, and gets the lock when the key's lease runs out.
    let next = locker
        .lock(&key)
        .wait(Duration::from_secs(6))
        .await
        .expect("the forgotten key expires");
    assert_ne!(holder_name(&harness, &key).await, first_name);
    next.release().await.expect("release");
    assert!(
        comes_back_to(&harness, &locker, &key, &first_name).await,
        "the forgotten lock's name is free again once its key expired"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_write_under_a_reused_name_is_deleted_and_passed_over() {
    // A write of an earlier request that reached the cluster after the
    // request gave up leaves a key under a name the backend reuses.
    let harness = EtcdHarness::from_env().await;
    let locker = Locker::new(EtcdBackend::connect(harness.endpoints()).await.expect("connect"));
    let key = unique_key("etcd-late-write");
    let guard = locker.lock(&key).await.expect("lock");
    let name = holder_name(&harness, &key).await;
    guard.release().await.expect("release");
    harness
        .admin()
        .put(name.as_str(), "0123456789abcdef0123456789abcdef", None)
        .await
        .expect("plant a late write");

    let guard = locker
        .lock(&key)
        .wait(Duration::from_secs(5))
        .await
        .expect("the request gets past the late write");
    assert_ne!(
        holder_name(&harness, &key).await,
        name,
        "the late write is deleted and the lock is held under another name"
    );
    guard.release().await.expect("release");
    assert!(
        comes_back_to(&harness, &locker, &key, &name).await,
        "the name is free again once the late write is deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_gives_up_frees_its_name() {
    let harness = EtcdHarness::from_env().await;
    let locker = Locker::new(EtcdBackend::connect(harness.endpoints()).await.expect("connect"));
    let key = unique_key("etcd-gave-up-name");
    let held = locker.lock(&key).await.expect("lock");
    let waiting = {
        let (locker, key) = (locker.clone(), key.clone());
        tokio::spawn(async move { locker.lock(&key).wait(Duration::from_millis(500)).await })
    };
    let gave_up_name = harness.queue_of_length(&key, 2).await[1].0.clone();
    assert!(matches!(
        waiting.await.expect("waiter task"),
        Err(LockError::Timeout { .. })
    ));
    // The clean-up deletes its key, then frees its name: a later waiter of
    // this backend gets it (waiters that come in between are cancelled).
    let mut names = Vec::new();
    for _ in 0..20 {
        harness.queue_of_length(&key, 1).await;
        let waiting = {
            let (locker, key) = (locker.clone(), key.clone());
            tokio::spawn(async move { locker.lock(&key).wait(Duration::from_secs(5)).await })
        };
        names.push(harness.queue_of_length(&key, 2).await[1].0.clone());
        waiting.abort();
        if names.last() == Some(&gave_up_name) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(names.last(), Some(&gave_up_name), "{names:?}");
    held.release().await.expect("release");
}
