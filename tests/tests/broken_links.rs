//! Servers that answer garbage, close in the middle of a reply, refuse
//! connections or stop answering, put between client and server by the
//! testkit's `FaultProxy`; and a huge number of distinct keys. Each gives a
//! typed error in time and leaves no lock behind.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_etcd::EtcdBackend;
use dlock_redis::RedisBackend;
use dlock_testkit::conformance::{Harness, unique_key};
use dlock_testkit::{Direction, FaultProxy};
use dlock_tests::{EtcdHarness, RedisHarness, assert_unavailable_within, etcd_endpoints, redis_url};
use futures_util::StreamExt;
use tokio::time::{Instant, sleep};

fn socket_address(url: &str) -> SocketAddr {
    let authority = url
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("host:port in the URL");
    authority.parse().expect("a loopback socket address")
}

async fn redis_through_proxy() -> (FaultProxy, Locker, RedisHarness) {
    let proxy = FaultProxy::start(socket_address(&redis_url()))
        .await
        .expect("proxy");
    let backend = RedisBackend::builder(&format!("redis://{}", proxy.address()))
        .command_timeout(Duration::from_millis(500))
        .connect()
        .await
        .expect("connect through the proxy");
    (proxy, Locker::new(backend), RedisHarness::from_env().await)
}

/// Arms the proxy's one-shot fault: half a reply and a close, or garbage.
fn break_next_reply(proxy: &FaultProxy, cut: bool) {
    if cut {
        proxy.break_next_reply();
    } else {
        proxy.corrupt_next_reply();
    }
}

/// Polls until the server keeps nothing for `key`, within `limit`.
async fn nothing_left(harness: &dyn Harness, key: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while harness.leftovers(key).await > 0 {
        assert!(Instant::now() < deadline, "a lock on {key} was left behind");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_garbled_or_cut_replies_are_typed_errors_and_leave_no_lock() {
    let (proxy, locker, harness) = redis_through_proxy().await;
    for (round, break_it) in [("garbage", false), ("cut", true)] {
        let key = unique_key(&format!("redis-{round}-reply"));
        break_next_reply(&proxy, break_it);
        // The acquire script ran on the server; only its reply was broken.
        let outcome = locker.lock(&key).ttl(Duration::from_secs(30)).await;
        assert!(
            matches!(outcome, Err(LockError::Unavailable { .. })),
            "{round}: {outcome:?}"
        );
        // The unknown outcome is cleaned up well before the 30 s TTL.
        nothing_left(&harness, &key, Duration::from_secs(5)).await;
        // The backend is usable again.
        let guard = locker.try_lock(&key).await.expect("free again");
        guard.release().await.expect("release");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refused_or_silent_links_give_unavailable_in_time() {
    let proxy = FaultProxy::start(socket_address(&redis_url()))
        .await
        .expect("proxy");
    proxy.set_refuse_new(true);
    let url = format!("redis://{}", proxy.address());
    assert_unavailable_within(
        Duration::from_secs(3),
        RedisBackend::builder(&url)
            .connect_timeout(Duration::from_secs(1))
            .connect(),
    )
    .await;
    proxy.set_refuse_new(false);
    let locker = Locker::new(
        RedisBackend::builder(&url)
            .command_timeout(Duration::from_millis(500))
            .connect()
            .await
            .expect("connect once accepted"),
    );
    // Replies stop arriving: the request ends at the command timeout.
    proxy.set_blackhole_toward(Direction::ToClient, true);
    let key = unique_key("silent-link");
    assert_unavailable_within(Duration::from_secs(3), locker.try_lock(&key)).await;
    proxy.set_blackhole_toward(Direction::ToClient, false);
    proxy.cut();
    let harness = RedisHarness::from_env().await;
    nothing_left(&harness, &key, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_garbage_and_cut_replies_are_typed_errors_and_leave_no_lock() {
    let endpoint = etcd_endpoints().into_iter().next().expect("an etcd endpoint");
    let proxy = FaultProxy::start(socket_address(&endpoint)).await.expect("proxy");
    let harness = EtcdHarness::from_env().await;
    let backend = EtcdBackend::builder([format!("http://{}", proxy.address())])
        .request_timeout(Duration::from_secs(1))
        .connect()
        .await
        .expect("connect through the proxy");
    let locker = Locker::new(backend);
    for (round, break_it) in [("garbage", false), ("cut", true)] {
        let key = unique_key(&format!("etcd-{round}-reply"));
        break_next_reply(&proxy, break_it);
        match locker.lock(&key).ttl(Duration::from_secs(30)).await {
            Err(LockError::Unavailable { .. }) => {}
            // The broken chunk may have been a keep-alive frame rather than
            // this request's reply; then the lock must work normally.
            Ok(guard) => guard.release().await.expect("release"),
            Err(other) => panic!("{round}: expected Unavailable or a grant, got {other:?}"),
        }
        nothing_left(&harness, &key, Duration::from_secs(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_distinct_keys_leave_nothing_behind() {
    let harness = RedisHarness::from_env().await;
    let locker = Locker::new(harness.deployment().connect().await.expect("connect"));
    let prefix = unique_key("many-keys");
    let keys: Vec<String> = (0..10_000).map(|index| format!("{prefix}/{index}")).collect();
    let guards: Vec<_> = futures_util::stream::iter(&keys)
        .map(|key| {
            locker
                .lock(key)
                .ttl(Duration::from_secs(60))
                .auto_renew(false)
                .into_future()
        })
        .buffer_unordered(256)
        .collect()
        .await;
    let mut held = Vec::with_capacity(guards.len());
    for guard in guards {
        held.push(guard.expect("every distinct key is free"));
    }
    let released: Vec<_> = futures_util::stream::iter(held)
        .map(|guard| guard.release())
        .buffer_unordered(256)
        .collect()
        .await;
    assert!(released.iter().all(Result::is_ok), "every release succeeds");
    let left: usize = futures_util::stream::iter(&keys)
        .map(|key| harness.leftovers(key))
        .buffer_unordered(64)
        .collect::<Vec<usize>>()
        .await
        .into_iter()
        .sum();
    assert_eq!(left, 0, "locks left behind");
}
