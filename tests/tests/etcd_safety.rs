//! The etcd side of the safety review: a waiter key on a lease other than
//! the one whose validity a grant reports, and a queue write that commits
//! after its request gave up. Each test starts its own 3-member cluster
//! and reaches some members through fault proxies.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_etcd::EtcdBackend;
use dlock_servers::etcd::EtcdCluster;
use dlock_testkit::conformance::unique_key;
use dlock_testkit::{Direction, FaultProxy};
use etcd_client::{Client, GetOptions};
use tokio::task::{block_in_place, spawn_blocking};
use tokio::time::{Instant, sleep, timeout};

async fn cluster() -> EtcdCluster {
    match spawn_blocking(|| EtcdCluster::start(3)).await {
        Ok(Ok(cluster)) => cluster,
        Ok(Err(message)) => panic!("{message}"),
        Err(error) => panic!("cluster setup panicked: {error}"),
    }
}

async fn proxy_to(endpoint: &str) -> FaultProxy {
    let address: SocketAddr = endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("an endpoint address");
    FaultProxy::start(address).await.expect("proxy")
}

fn through(proxy: &FaultProxy) -> String {
    format!("http://{}", proxy.address())
}

/// The waiter keys of `key`'s queue, oldest first: (name, lease).
async fn queue(admin: &mut Client, names: &EtcdBackend, key: &str) -> Vec<(String, i64)> {
    let listing = GetOptions::new()
        .with_prefix()
        .with_sort(etcd_client::SortTarget::Create, etcd_client::SortOrder::Ascend);
    admin
        .get(names.queue_prefix(key), Some(listing))
        .await
        .expect("list the queue")
        .kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
        .collect()
}

async fn queue_of_length(
    admin: &mut Client,
    names: &EtcdBackend,
    key: &str,
    length: usize,
) -> Vec<(String, i64)> {
    let began = Instant::now();
    loop {
        let found = queue(admin, names, key).await;
        if found.len() == length {
            return found;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "queue of {key}: {found:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// A waiter whose session was given up locally while its lease lived on
/// (here the test keeps that lease alive, as a keep-alive that reached the
/// server but whose answers were lost would) must not be granted on that
/// lease with the new session's validity: the old lease then runs out
/// unrenewed, the key goes, and a successor acquires beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_after_a_lost_session_is_on_the_lease_it_reports() {
    let cluster = cluster().await;
    let endpoints = cluster.endpoints();
    let mut admin = Client::connect(&endpoints, None).await.expect("admin client");
    let proxy = proxy_to(&endpoints[0]).await;
    let waiting_backend = EtcdBackend::builder([through(&proxy)])
        .request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect("connect through the proxy");
    let waiting = Locker::new(waiting_backend.clone());
    let others = Locker::new(EtcdBackend::connect(&endpoints).await.expect("connect"));
    let ttl = Duration::from_secs(2);
    let key = unique_key("etcd-lost-session");

    // The waiter's backend holds another lock on the same session, so the
    // session is not dropped (and its lease revoked) when it is given up.
    let other_lock = waiting
        .lock(unique_key("etcd-lost-session-other"))
        .ttl(ttl)
        .await
        .expect("lock");
    let held = others
        .lock(&key)
        .ttl(Duration::from_secs(30))
        .await
        .expect("holder");
    let waiter = {
        let (waiting, key) = (waiting.clone(), key.clone());
        tokio::spawn(async move { waiting.lock(&key).ttl(ttl).wait(Duration::from_secs(60)).await })
    };
    let queued = queue_of_length(&mut admin, &waiting_backend, &key, 2).await;
    let old_lease = queued[1].1;

    // Keep the waiter's lease alive from outside while its client hears
    // nothing: the client gives its session up, the server keeps the lease.
    let keeping = Arc::new(AtomicBool::new(true));
    let keeper = {
        let (mut admin, keeping) = (admin.clone(), Arc::clone(&keeping));
        tokio::spawn(async move {
            let (mut keeper, mut answers) = admin.lease_keep_alive(old_lease).await.expect("keep-alive");
            while keeping.load(Ordering::SeqCst) {
                keeper.keep_alive().await.expect("keep-alive request");
                let _ = answers.message().await;
                sleep(Duration::from_millis(300)).await;
            }
        })
    };
    proxy.set_blackhole(true);
    sleep(ttl * 2).await;
    assert!(!other_lock.is_held(), "the client gave its session up");
    proxy.set_blackhole(false);
    proxy.cut();

    held.release().await.expect("release");
    let granted = match timeout(Duration::from_secs(30), waiter).await {
        Ok(Ok(Ok(guard))) => guard,
        other => panic!("the waiter gets the lock: {other:?}"),
    };
    // From now on only the waiter's client keeps its lease alive.
    keeping.store(false, Ordering::SeqCst);
    keeper.await.expect("keeper task");
    sleep(ttl * 2).await;
    assert!(
        granted.is_held(),
        "the grant must be on a lease its client keeps alive"
    );
    match others.try_lock(&key).await {
        Err(LockError::Contended { .. }) => {}
        other => panic!("a second holder beside the waiter: {other:?}"),
    }
    granted.release().await.expect("release");
    drop(other_lock);
}

/// A first queue write that is still on its way when its request gives up
/// (it timed out on two members, which used up its time, and the clean-up went to a third) and commits
/// after the clean-up ran must not leave a key behind: on the client's
/// kept-alive session it would sit at the head of the queue for as long as
/// the process lives, and nobody else would ever get the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_write_that_commits_after_its_request_gave_up_leaves_no_key() {
    let cluster = cluster().await;
    let endpoints = cluster.endpoints();
    let mut admin = Client::connect(&endpoints, None).await.expect("admin client");
    let leader = block_in_place(|| cluster.leader()).expect("the leader");
    let follower = (leader + 1) % 3;
    let third = (leader + 2) % 3;
    let slow = proxy_to(&endpoints[leader]).await;
    let dead = proxy_to(&endpoints[follower]).await;
    let backend = EtcdBackend::builder([through(&slow), through(&dead), endpoints[third].clone()])
        .request_timeout(Duration::from_millis(400))
        .connect()
        .await
        .expect("connect");
    let locker = Locker::new(backend.clone());
    let ttl = Duration::from_secs(10);
    // A warm session for that TTL, so that the attempt below is one write.
    locker
        .lock(unique_key("etcd-late-write-warm"))
        .ttl(ttl)
        .await
        .expect("warm")
        .release()
        .await
        .expect("release");

    let key = unique_key("etcd-late-write");
    slow.set_latency_toward(Direction::ToServer, Duration::from_secs(2));
    dead.set_blackhole_toward(Direction::ToServer, true);
    match locker.lock(&key).ttl(ttl).try_lock().await {
        Err(LockError::Unavailable { .. }) => {}
        other => panic!("expected the attempt to time out, got {other:?}"),
    }
    // The clean-up runs on the third member; the slow write lands later.
    sleep(Duration::from_secs(4)).await;
    let left = queue(&mut admin, &backend, &key).await;
    assert!(
        left.is_empty(),
        "a key outlived the request that wrote it: {left:?}"
    );
    let other = Locker::new(EtcdBackend::connect(&endpoints).await.expect("connect"));
    let guard = other
        .try_lock(&key)
        .await
        .expect("nobody holds the key once the request gave up");
    guard.release().await.expect("release");
}
