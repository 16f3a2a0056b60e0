//! The etcd cluster under test and its harness.

use async_trait::async_trait;
use dlock_core::Locker;
use dlock_testkit::conformance::{Harness, SuiteConfig};

use crate::list_from_env;

/// The client endpoints of the etcd cluster xtask starts
/// (`DLOCK_TEST_ETCD_ENDPOINTS`).
pub fn etcd_endpoints() -> Vec<String> {
    list_from_env("DLOCK_TEST_ETCD_ENDPOINTS")
}

/// The Prometheus metrics of the etcd member at `endpoint` (an
/// `http://host:port` client URL), as text.
pub async fn etcd_member_metrics(endpoint: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = endpoint.trim_start_matches("http://");
    let mut connection = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to a member");
    connection
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await
        .expect("ask for metrics");
    let mut text = String::new();
    connection.read_to_string(&mut text).await.expect("read metrics");
    text
}

/// The sum of the values of the metric lines that start with `prefix` (0
/// when there is none).
pub fn metric_value(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(prefix))
        .map(|line| {
            line.rsplit(' ')
                .next()
                .and_then(|value| value.parse::<f64>().ok())
                .expect("a metric value") as u64
        })
        .sum()
}

/// The conformance harness for [`dlock_etcd::EtcdBackend`]: every locker is
/// a new backend (its own connection and sessions).
pub struct EtcdHarness {
    endpoints: Vec<String>,
    names: dlock_etcd::EtcdBackend,
    admin: etcd_client::Client,
}

impl EtcdHarness {
    /// A harness on the cluster named by `DLOCK_TEST_ETCD_ENDPOINTS`.
    pub async fn from_env() -> Self {
        Self::new(etcd_endpoints()).await
    }

    /// A harness on the cluster at `endpoints`.
    pub async fn new(endpoints: Vec<String>) -> Self {
        let names = dlock_etcd::EtcdBackend::connect(&endpoints)
            .await
            .expect("connect the harness backend");
        let admin = etcd_client::Client::connect(&endpoints, None)
            .await
            .expect("admin connection to etcd");
        EtcdHarness {
            endpoints,
            names,
            admin,
        }
    }

    /// The client endpoints.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A backend for key names.
    pub fn names(&self) -> &dlock_etcd::EtcdBackend {
        &self.names
    }

    /// A raw client for arranging and inspecting state.
    pub fn admin(&self) -> etcd_client::Client {
        self.admin.clone()
    }

    /// The waiter keys queued for `key`, oldest first.
    pub async fn queue(&self, key: &str) -> Vec<(String, i64)> {
        let options = etcd_client::GetOptions::new()
            .with_prefix()
            .with_sort(etcd_client::SortTarget::Create, etcd_client::SortOrder::Ascend);
        let found = self
            .admin()
            .get(self.names.queue_prefix(key), Some(options))
            .await
            .expect("list the queue");
        found
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.create_revision(),
                )
            })
            .collect()
    }

    /// The queue of `key` once it has `length` waiter keys (polled for up
    /// to 2 s); fails the test if it never does.
    pub async fn queue_of_length(&self, key: &str, length: usize) -> Vec<(String, i64)> {
        let mut queued = Vec::new();
        for _ in 0..200 {
            queued = self.queue(key).await;
            if queued.len() == length {
                return queued;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("expected {length} waiter keys for {key}, found {queued:?}");
    }
}

#[async_trait]
impl Harness for EtcdHarness {
    async fn locker(&self) -> Locker {
        let backend = dlock_etcd::EtcdBackend::connect(&self.endpoints)
            .await
            .expect("connect a client backend");
        Locker::new(backend)
    }

    async fn force_expire(&self, key: &str) {
        // The holder is the oldest waiter key; its lease ending deletes it.
        if let Some((holder, _)) = self.queue(key).await.into_iter().next() {
            self.admin()
                .delete(holder, None)
                .await
                .expect("delete the holder's key");
        }
    }

    async fn leftovers(&self, key: &str) -> usize {
        self.queue(key).await.len()
    }

    fn config(&self) -> SuiteConfig {
        // Leases are whole seconds; FIFO order is a capability of this backend.
        SuiteConfig::default()
            .short_ttl(std::time::Duration::from_secs(2))
            .fifo(true)
            .election_fifo(true)
    }
}
