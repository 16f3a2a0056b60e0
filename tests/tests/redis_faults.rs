//! Redis deployments that lose a server while locks are held. Each test
//! starts its own servers (through `dlock-servers`, like xtask does) so that
//! killing them harms no other test.

use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_redis::RedisBackend;
use dlock_servers::redis::{self as servers, RedisCluster, RedisSentinel, SENTINEL_MASTER_NAME};
use tokio::task::{block_in_place, spawn_blocking};
use tokio::time::timeout;

/// Runs a blocking server setup off the async workers; a missing
/// redis-server fails with the xtask command that installs it.
async fn start<T: Send + 'static>(setup: impl FnOnce() -> dlock_servers::Result<T> + Send + 'static) -> T {
    match spawn_blocking(setup).await {
        Ok(Ok(servers)) => servers,
        Ok(Err(message)) => panic!("{message}"),
        Err(error) => panic!("server setup panicked: {error}"),
    }
}

/// Waits until a waiter stands in `line_key`'s line on the server on
/// `port`, listening for the hand-over.
async fn until_in_line(port: u16, line_key: &str) {
    assert!(
        dlock_tests::in_line_within(port, line_key, Duration::from_secs(10)).await,
        "nobody waits in {line_key}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_loses_its_locks_and_the_backend_reconnects() {
    let mut server = start(|| servers::start_server("redis-restart", &[])).await;
    let url = format!("{}/0", servers::url(server.port()));
    let backend = RedisBackend::connect(&url).await.expect("connect");
    let locker = Locker::new(backend.clone());
    let ttl = Duration::from_secs(2);
    let first = locker.lock("restart/a").ttl(ttl).await.expect("lock a");
    let second = locker.lock("restart/b").ttl(ttl).await.expect("lock b");

    // Another client waits for `restart/a` across the restart.
    let waiter_locker = Locker::new(RedisBackend::connect(&url).await.expect("connect waiter"));
    let waiter = tokio::spawn(async move {
        waiter_locker
            .lock("restart/a")
            .ttl(ttl)
            .wait(Duration::from_secs(20))
            .await
    });
    until_in_line(server.port(), &backend.line_key("restart/a")).await;

    block_in_place(|| {
        server.restart().expect("restart");
        servers::wait_ping(&mut server).expect("the server is back");
    });

    // The restarted server is empty: both guards learn their locks are gone.
    for guard in [&first, &second] {
        timeout(ttl * 3, guard.lost())
            .await
            .expect("the guard reports the loss");
        assert!(!guard.is_held());
    }
    assert!(matches!(first.extend(ttl).await, Err(LockError::Lost { .. })));

    // The same backend works again without the user reconnecting.
    let again = locker
        .lock("restart/c")
        .wait(Duration::from_secs(10))
        .await
        .expect("lock after the restart");
    again.release().await.expect("release");

    // The waiter was not stranded.
    let taken = timeout(Duration::from_secs(20), waiter)
        .await
        .expect("the waiter finishes")
        .expect("waiter task")
        .expect("the waiter gets the lock after the restart");
    assert!(taken.is_held());
    taken.release().await.expect("release");
}

/// The next item an observation yields within `within`; an `Err` fails
/// the test (a restart shorter than the outage grace is ridden out).
async fn next_leader(changes: &mut dlock_core::Observation, within: Duration) -> Option<dlock_core::Leader> {
    use futures_util::StreamExt;
    timeout(within, changes.next())
        .await
        .expect("an observation item in time")
        .expect("the observation goes on")
        .expect("no error across a restart")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_observer_rides_out_a_restart() {
    let mut server = start(|| servers::start_server("redis-observe-restart", &[])).await;
    let url = format!("{}/0", servers::url(server.port()));
    let leader_locker = Locker::new(RedisBackend::connect(&url).await.expect("connect"));
    let observer_locker = Locker::new(RedisBackend::connect(&url).await.expect("connect observer"));
    let key = "restart/election";
    let leadership = leader_locker
        .election(key)
        .campaign("before")
        .ttl(Duration::from_secs(20))
        .await
        .expect("leads");
    let mut changes = observer_locker.election(key).observe();
    let first = next_leader(&mut changes, Duration::from_secs(5)).await;
    assert_eq!(first.map(|leader| leader.value).as_deref(), Some("before"));

    block_in_place(|| {
        server.restart().expect("restart");
        servers::wait_ping(&mut server).expect("the server is back");
    });
    // The restarted server is empty: the observer reads again and says so.
    assert_eq!(next_leader(&mut changes, Duration::from_secs(10)).await, None);
    timeout(Duration::from_secs(20), leadership.lost())
        .await
        .expect("the old leader learns its leadership is gone");

    // Notifications reach the observer again.
    let next = Locker::new(RedisBackend::connect(&url).await.expect("connect"))
        .election(key)
        .campaign("after")
        .wait(Duration::from_secs(10))
        .await
        .expect("a new leader after the restart");
    let shown = next_leader(&mut changes, Duration::from_secs(5)).await;
    assert_eq!(
        shown.map(|leader| (leader.value, leader.term)),
        Some(("after".to_owned(), next.term()))
    );
    next.resign().await.expect("resign");
    assert_eq!(next_leader(&mut changes, Duration::from_secs(5)).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_to_the_replica_is_followed() {
    let mut group = start(RedisSentinel::start).await;
    let backend = RedisBackend::connect_sentinel(group.sentinel_urls(), SENTINEL_MASTER_NAME)
        .await
        .expect("connect through the sentinels");
    let locker = Locker::new(backend.clone());
    let before = locker
        .try_lock("failover/a")
        .await
        .expect("lock before the failover");
    let token_before = before.fencing_token();
    before.release().await.expect("release");

    // A holder without renewal, and a client waiting for it on another backend.
    let holder = locker
        .lock("failover/held")
        .ttl(Duration::from_secs(3))
        .auto_renew(false)
        .await
        .expect("holder");
    let waiter_backend = RedisBackend::connect_sentinel(group.sentinel_urls(), SENTINEL_MASTER_NAME)
        .await
        .expect("connect waiter");
    let waiter = tokio::spawn(async move {
        Locker::new(waiter_backend)
            .lock("failover/held")
            .wait(Duration::from_secs(40))
            .await
    });
    let master_port = group
        .master_url()
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("port");
    until_in_line(master_port, &backend.line_key("failover/held")).await;
    // Let the replica confirm the writes so far (the replication window is
    // documented in docs/SAFETY.md; this test is about following the master).
    block_in_place(|| servers::wait_replicated(master_port)).expect("the replica catches up");

    group.kill_master();
    block_in_place(|| group.wait_failover()).expect("the sentinels promote the replica");

    let after = locker
        .lock("failover/a")
        .wait(Duration::from_secs(30))
        .await
        .expect("the same backend locks on the new master");
    assert!(
        after.fencing_token() > token_before,
        "{:?} after {:?}",
        after.fencing_token(),
        token_before
    );
    after.release().await.expect("release on the new master");

    let waited = timeout(Duration::from_secs(40), waiter)
        .await
        .expect("the waiter finishes")
        .expect("waiter task")
        .expect("the waiter gets the lock on the new master");
    assert!(waited.fencing_token() > holder.fencing_token());
    waited.release().await.expect("release");
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keeps_working_when_a_master_dies() {
    let mut cluster = start(|| RedisCluster::start(3)).await;
    let backend = RedisBackend::connect_cluster(cluster.urls())
        .await
        .expect("connect");
    let locker = Locker::new(backend.clone());
    let key = "cluster/failover";
    let before = locker.try_lock(key).await.expect("lock before");
    let token_before = before.fencing_token();
    before.release().await.expect("release");

    let victim = cluster
        .master_for(&backend.lock_key(key))
        .expect("master of the key");
    let victim_port = cluster.port(victim).expect("port");
    // The replica confirms the counter before the master dies.
    block_in_place(|| servers::wait_replicated(victim_port)).expect("the replica catches up");
    cluster.kill(victim);

    let after = locker
        .lock(key)
        .wait(Duration::from_secs(30))
        .await
        .expect("the key's slot moves to the promoted replica");
    assert!(after.fencing_token() > token_before);
    after.release().await.expect("release");
    let promoted = cluster.master_for(&backend.lock_key(key)).expect("new master");
    assert_ne!(promoted, victim);

    // Keys in every slot work again.
    for index in 0..20 {
        let guard = locker
            .lock(format!("cluster/after/{index}"))
            .wait(Duration::from_secs(10))
            .await
            .expect("lock after the failover");
        guard.release().await.expect("release");
    }
}
