//! A backend sends its requests to the leader, whichever member its list
//! names first: a follower would forward every write, one more hop each.
//! Counted from the members' own metrics; a test binary of its own so that
//! no other test's requests move the counts.

use dlock_core::Locker;
use dlock_etcd::EtcdBackend;
use dlock_testkit::conformance::unique_key;
use dlock_tests::{etcd_endpoints, etcd_member_metrics, metric_value};

const TXNS_STARTED: &str = "grpc_server_started_total{grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\"";

/// Transactions each member has started so far, in `endpoints` order.
async fn txns(endpoints: &[String]) -> Vec<u64> {
    let mut counts = Vec::new();
    for endpoint in endpoints {
        counts.push(metric_value(&etcd_member_metrics(endpoint).await, TXNS_STARTED));
    }
    counts
}

/// The members' endpoints with the leader last.
async fn leader_last(mut endpoints: Vec<String>) -> Vec<String> {
    let mut leader = None;
    for (index, endpoint) in endpoints.iter().enumerate() {
        let mut client = etcd_client::Client::connect([endpoint], None)
            .await
            .expect("connect to a member");
        let status = client.status().await.expect("member status");
        let member = status.header().expect("a response header").member_id();
        if status.leader() == member {
            leader = Some(index);
        }
    }
    let leader = endpoints.remove(leader.expect("a member is the leader"));
    endpoints.push(leader);
    endpoints
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_are_taken_and_released_on_the_leader() {
    let endpoints = leader_last(etcd_endpoints()).await;
    let locker = Locker::new(EtcdBackend::connect(&endpoints).await.expect("connect"));
    let key = unique_key("etcd-leader");
    locker
        .lock(&key)
        .await
        .expect("warm-up lock")
        .release()
        .await
        .expect("release");
    let before = txns(&endpoints).await;
    for _ in 0..20 {
        let guard = locker.lock(&key).await.expect("lock");
        guard.release().await.expect("release");
    }
    let after = txns(&endpoints).await;
    let sent: Vec<u64> = after
        .iter()
        .zip(&before)
        .map(|(after, before)| after - before)
        .collect();
    let (followers, leader) = sent.split_at(sent.len() - 1);
    assert!(
        leader[0] >= 40,
        "the leader started {} transactions, fewer than 2 per cycle: {sent:?}",
        leader[0]
    );
    assert!(
        followers.iter().all(|count| *count == 0),
        "followers were sent transactions (leader last): {sent:?}"
    );
}
