//! `EtcdBackend` on clusters of its own: when members die, and where a
//! count of revisions must not see other tests' writes. Each test starts
//! its own 3-member cluster.

use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_etcd::EtcdBackend;
use dlock_servers::etcd::EtcdCluster;
use dlock_testkit::conformance::unique_key;
use dlock_testkit::{CheckerConfig, check_mutual_exclusion};
use tokio::task::{block_in_place, spawn_blocking};
use tokio::time::{Instant, sleep, timeout};

async fn cluster() -> EtcdCluster {
    match spawn_blocking(|| EtcdCluster::start(3)).await {
        Ok(Ok(cluster)) => cluster,
        Ok(Err(message)) => panic!("{message}"),
        Err(error) => panic!("cluster setup panicked: {error}"),
    }
}

/// An observer of an election keeps reporting the truth, without errors,
/// when the etcd member its watch stream is on (the leader) is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_rides_out_a_member_kill() {
    use futures_util::StreamExt;
    let mut cluster = cluster().await;
    let endpoints = cluster.endpoints();
    let locker = Locker::new(EtcdBackend::connect(&endpoints).await.expect("connect"));
    let observer = Locker::new(EtcdBackend::connect(&endpoints).await.expect("connect observer"));
    let key = unique_key("etcd-observe-kill");
    let leadership = locker.election(&key).campaign("v1").await.expect("leads");
    let mut changes = observer.election(&key).observe();
    let mut next = async || {
        timeout(Duration::from_secs(20), changes.next())
            .await
            .expect("an observation item in time")
            .expect("the observation goes on")
            .expect("no error across a member's death")
    };
    assert_eq!(next().await.map(|leader| leader.value).as_deref(), Some("v1"));
    let leader = block_in_place(|| cluster.leader()).expect("find the leader");
    cluster.kill(leader);
    // A proclamation after the election of a new etcd leader is seen.
    let proclaimed = async {
        loop {
            match leadership.proclaim("v2").await {
                Ok(()) => return,
                Err(LockError::Unavailable { .. }) => sleep(Duration::from_millis(200)).await,
                Err(error) => panic!("proclaim: {error}"),
            }
        }
    };
    timeout(Duration::from_secs(30), proclaimed)
        .await
        .expect("proclaimed after the kill");
    let shown = next().await.expect("someone leads");
    assert_eq!((shown.value.as_str(), shown.term), ("v2", leadership.term()));
    leadership.resign().await.expect("resign");
    assert_eq!(next().await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_keep_working_when_the_leader_is_killed() {
    let mut cluster = cluster().await;
    let endpoints = cluster.endpoints();
    let mut lockers = Vec::new();
    for _ in 0..8 {
        lockers.push(Locker::new(
            EtcdBackend::connect(&endpoints).await.expect("connect"),
        ));
    }
    let key = unique_key("etcd-leader-killed");
    let checker = tokio::spawn(async move {
        check_mutual_exclusion(&lockers, &key, CheckerConfig::default().load(8, 100)).await
    });
    sleep(Duration::from_millis(300)).await;
    assert!(
        !checker.is_finished(),
        "the run should still be going when the leader dies"
    );
    let leader = block_in_place(|| cluster.leader()).expect("find the leader");
    cluster.kill(leader);
    let report = timeout(Duration::from_secs(120), checker)
        .await
        .expect("the run finishes")
        .expect("checker task");
    // A lease may end during the election (the holder is told: its release
    // reports NotHeld); what must hold is safety and progress.
    report.assert_safe();
    assert_eq!(
        report.acquired, 800,
        "every acquisition succeeds after the election"
    );
    assert_ne!(block_in_place(|| cluster.leader()).expect("a new leader"), leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_acquire_fails_and_held_guards_turn_lost() {
    let mut cluster = cluster().await;
    let endpoints = cluster.endpoints();
    let backend = EtcdBackend::builder(&endpoints)
        .request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect("connect");
    let locker = Locker::new(backend);
    let ttl = Duration::from_secs(2);
    let held = locker.lock("no-quorum/held").ttl(ttl).await.expect("lock");
    cluster.kill(0);
    cluster.kill(1);

    let began = Instant::now();
    match locker.try_lock("no-quorum/new").await {
        Err(error @ LockError::Unavailable { .. }) => {
            assert!(error.to_string().contains("no-quorum/new"), "{error}");
        }
        other => panic!("expected Unavailable without quorum, got {other:?}"),
    }
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "took {:?}",
        began.elapsed()
    );
    timeout(ttl * 2, held.lost())
        .await
        .expect("the holder learns within its TTL that it cannot keep the lock");
    assert!(!held.is_held());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_and_unlock_on_a_warm_session_cost_two_writes() {
    let cluster = cluster().await;
    let endpoints = cluster.endpoints();
    let mut admin = etcd_client::Client::connect(&endpoints, None)
        .await
        .expect("admin");
    let locker = Locker::new(EtcdBackend::connect(&endpoints).await.expect("connect"));
    let ttl = Duration::from_secs(10);
    // Warm the session for this TTL.
    locker
        .lock("writes/warm")
        .ttl(ttl)
        .await
        .expect("lock")
        .release()
        .await
        .expect("release");
    let revision = |response: etcd_client::GetResponse| response.header().expect("header").revision();
    let count_only = || Some(etcd_client::GetOptions::new().with_count_only());
    let leases_before = admin.leases().await.expect("leases").leases().len();
    let before = revision(admin.get("/", count_only()).await.expect("get"));
    let guard = locker.lock("writes/cycle").ttl(ttl).await.expect("lock");
    guard.release().await.expect("release");
    let after = revision(admin.get("/", count_only()).await.expect("get"));
    assert_eq!(after - before, 2, "one put to lock, one delete to unlock");
    assert_eq!(
        admin.leases().await.expect("leases").leases().len(),
        leases_before,
        "no lease granted for the cycle"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loss_signal_outlives_the_member_its_watch_was_on() {
    // A backend's watches share one stream on the member in use, the first
    // endpoint at the start. Kill that member, then delete the holder's key
    // through another: the watch, created again on another member from
    // where it was, still sees the deletion.
    let mut cluster = cluster().await;
    let endpoints = cluster.endpoints();
    let locker = Locker::new(EtcdBackend::connect(&endpoints).await.expect("connect"));
    let key = unique_key("etcd-watch-member-killed");
    let guard = locker
        .lock(&key)
        .ttl(Duration::from_secs(60)) // renewals (every 20 s) do not find the loss first
        .await
        .expect("lock");
    let mut admin = etcd_client::Client::connect(&endpoints[1..], None)
        .await
        .expect("admin connection to the other members");
    cluster.kill(0);
    let prefix = format!("/dlock/{}/{key}/", key.len());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Until a leader is elected (if the killed member led), this fails.
        let deleted = admin
            .delete(
                prefix.as_str(),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await;
        if deleted.is_ok_and(|response| response.deleted() == 1) {
            break;
        }
        assert!(Instant::now() < deadline, "could not delete the key within 20 s");
        sleep(Duration::from_millis(100)).await;
    }
    timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("the holder learns of the deletion after its watch's member died");
    assert!(!guard.is_held());
}
