//! `RedlockBackend` when nodes die, restart empty, or answer slowly. Each
//! test starts its own 5 redis-servers so that killing them harms nobody.

use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_redis::{RedisBackend, RedlockBackend};
use dlock_servers::ServerProcess;
use dlock_servers::redis as servers;
use dlock_testkit::conformance::unique_key;
use dlock_testkit::{CheckerConfig, FaultProxy, check_mutual_exclusion};
use tokio::task::{block_in_place, spawn_blocking};
use tokio::time::{Instant, sleep, timeout};

async fn five_nodes() -> (Vec<ServerProcess>, Vec<String>) {
    let nodes = match spawn_blocking(|| servers::start_independent(5)).await {
        Ok(Ok(nodes)) => nodes,
        Ok(Err(message)) => panic!("{message}"),
        Err(error) => panic!("server setup panicked: {error}"),
    };
    let urls = nodes.iter().map(|node| servers::url(node.port())).collect();
    (nodes, urls)
}

/// Five nodes, the fifth reached through a fault proxy, and a locker on them
/// with `node_timeout`.
async fn five_nodes_the_last_behind_a_proxy(
    node_timeout: Duration,
) -> (Vec<ServerProcess>, FaultProxy, Locker) {
    let (nodes, mut urls) = five_nodes().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", nodes[4].port()).parse().expect("address"))
        .await
        .expect("proxy");
    urls[4] = format!("redis://{}", proxy.address());
    let locker = Locker::new(
        RedlockBackend::builder(&urls)
            .node_timeout(node_timeout)
            .connect()
            .await
            .expect("connect"),
    );
    (nodes, proxy, locker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_of_five_killed_mid_run_changes_nothing() {
    let (mut nodes, urls) = five_nodes().await;
    let mut lockers = Vec::new();
    for _ in 0..8 {
        lockers.push(Locker::new(
            RedlockBackend::connect(&urls).await.expect("connect"),
        ));
    }
    let key = unique_key("redlock-minority");
    let checker = tokio::spawn(async move {
        check_mutual_exclusion(&lockers, &key, CheckerConfig::default().load(8, 150)).await
    });
    sleep(Duration::from_millis(300)).await;
    assert!(
        !checker.is_finished(),
        "the run should still be going when the nodes die"
    );
    nodes[0].kill();
    nodes[3].kill();
    let report = timeout(Duration::from_secs(120), checker)
        .await
        .expect("the run finishes")
        .expect("checker task");
    report.assert_clean();
    assert_eq!(
        report.acquired, 1200,
        "every acquisition succeeds with 3 of 5 nodes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_of_five_killed_means_no_lock_for_anyone() {
    let (mut nodes, urls) = five_nodes().await;
    let locker = Locker::new(RedlockBackend::connect(&urls).await.expect("connect"));
    let ttl = Duration::from_secs(2);
    let held = locker.lock("majority-lost/held").ttl(ttl).await.expect("lock");
    for node in &mut nodes[..3] {
        node.kill();
    }
    // The holder cannot renew on a majority: lost within its validity.
    timeout(ttl * 2, held.lost())
        .await
        .expect("the guard reports the loss");
    assert!(!held.is_held());
    // Nobody gets a lock, and the error names the nodes that failed.
    for attempt in 0..5 {
        match locker.try_lock(format!("majority-lost/{attempt}")).await {
            Err(error @ LockError::Unavailable { .. }) => {
                let text = error.to_string();
                assert!(text.contains("3 needed"), "{text}");
                assert!(text.contains(&urls[0]), "the failed node is named: {text}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    // A waiting request gives up with the same cause once its wait runs out.
    let waited = locker
        .lock("majority-lost/wait")
        .wait(Duration::from_millis(500))
        .await;
    assert!(matches!(waited, Err(LockError::Unavailable { .. })), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_empty_after_the_ttl_keeps_the_lock_safe() {
    let (mut nodes, urls) = five_nodes().await;
    // Generous timing: this test is about safety, and a busy 2-core CI
    // machine can delay a renewal by more than the default 100 ms per node.
    let ttl = Duration::from_secs(3);
    let connect = || {
        RedlockBackend::builder(&urls)
            .node_timeout(Duration::from_millis(500))
            .connect()
    };
    let holder = Locker::new(connect().await.expect("connect holder"));
    let rival = Locker::new(connect().await.expect("connect rival"));
    let key = "restart-empty/job";
    let guard = holder.lock(key).ttl(ttl).await.expect("lock");
    let token = guard.fencing_token();
    // The grant returns at a majority, and the slower nodes get it too
    // within the node timeout; with it on all five, losing one node must
    // not cost the lock.
    let lock_key = format!("dlock:{{{key}}}");
    let on_all = async {
        while !nodes.iter().all(|node| {
            matches!(
                servers::command(node.port(), &["EXISTS", &lock_key]),
                Ok(servers::Reply::Integer(1))
            )
        }) {
            sleep(Duration::from_millis(10)).await;
        }
    };
    timeout(Duration::from_secs(1), on_all)
        .await
        .expect("the grant reaches every node, not just the first majority");

    // Node 0 crashes and loses its data. The delayed-restart rule: it comes
    // back only after the longest TTL in use has passed, so every lease it
    // knew has ended by then (the holder renewed on the other four).
    nodes[0].kill();
    sleep(ttl + Duration::from_millis(200)).await;
    block_in_place(|| {
        nodes[0].restart().expect("restart");
        servers::wait_ping(&mut nodes[0]).expect("node 0 is back");
    });
    assert!(guard.is_held(), "four of five nodes kept the lease alive");
    match rival.try_lock(key).await {
        Err(LockError::Contended { .. }) => {}
        other => panic!("the rival must not get a majority: {other:?}"),
    }
    guard.release().await.expect("release");
    let next = rival.try_lock(key).await.expect("free after release");
    assert!(
        next.fencing_token() > token,
        "{:?} after {token:?}",
        next.fencing_token()
    );
    next.release().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_does_not_slow_the_acquire_past_the_node_timeout() {
    let (_nodes, slow, locker) = five_nodes_the_last_behind_a_proxy(Duration::from_millis(50)).await;
    slow.set_latency(Duration::from_secs(2));
    for round in 0..10 {
        let began = Instant::now();
        let guard = locker
            .try_lock(format!("slow-node/{round}"))
            .await
            .expect("lock with 4 fast nodes");
        let took = began.elapsed();
        // The quorum of fast nodes decides; the slow node's 2 s never count.
        assert!(took < Duration::from_millis(500), "acquire took {took:?}");
        // Confirmed by the four fast nodes; the slow one's copy ends with the TTL.
        guard.release().await.expect("release");
    }
}

/// `release` returns once every node has answered (or its node timeout
/// passed), so a process that exits right after it leaves no copy of the
/// lock behind on a node that answers slowly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_leaves_no_copy_on_a_slow_node() {
    let (nodes, slow, locker) = five_nodes_the_last_behind_a_proxy(Duration::from_millis(800)).await;
    let mut direct = Vec::new();
    for node in &nodes {
        let client = redis::Client::open(servers::url(node.port())).expect("node URL");
        direct.push(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to a node"),
        );
    }
    let latency = Duration::from_millis(100);
    slow.set_latency(latency);
    for _ in 0..5 {
        let key = unique_key("slow-node-release");
        let guard = locker.try_lock(&key).await.expect("lock");
        // Long enough for the slow node's grant to land before the release
        // is sent, which then takes the latency to reach it.
        sleep(latency * 2).await;
        guard.release().await.expect("release");
        for (index, connection) in direct.iter_mut().enumerate() {
            let copies: i64 = redis::cmd("EXISTS")
                .arg(format!("{}{{{key}}}", RedisBackend::DEFAULT_KEY_PREFIX))
                .query_async(connection)
                .await
                .expect("EXISTS on a node");
            assert_eq!(copies, 0, "node {index} still holds {key} after release returned");
        }
    }
}

/// A node down at start whose connect then takes longer than the node
/// timeout (a slow handshake) still joins: its connect runs to the end in
/// the background instead of being cut off by every operation's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_at_start_joins_even_when_its_connect_outlasts_the_node_timeout() {
    let (nodes, mut urls) = five_nodes().await;
    let proxy = FaultProxy::start(format!("127.0.0.1:{}", nodes[4].port()).parse().expect("address"))
        .await
        .expect("proxy");
    urls[4] = format!("redis://{}", proxy.address());
    proxy.set_refuse_new(true);
    let locker = Locker::new(
        RedlockBackend::builder(&urls)
            .node_timeout(Duration::from_millis(200))
            .connect()
            .await
            .expect("connect with 4 of 5"),
    );
    proxy.set_refuse_new(false);
    proxy.set_connect_delay(Duration::from_millis(600));
    let key = unique_key("redlock-late-node");
    let lock_key = format!("{}{{{key}}}", RedisBackend::DEFAULT_KEY_PREFIX);
    let began = Instant::now();
    loop {
        let guard = locker
            .lock(&key)
            .wait(Duration::from_secs(5))
            .await
            .expect("lock");
        let on_late_node = block_in_place(|| servers::command(nodes[4].port(), &["EXISTS", &lock_key]))
            .expect("EXISTS")
            .text();
        guard.release().await.expect("release");
        if on_late_node.trim() == "1" {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "the late node never took part: its connect was cut off by the 200 ms node timeout"
        );
        sleep(Duration::from_millis(100)).await;
    }
}
