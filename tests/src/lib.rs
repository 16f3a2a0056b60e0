//! Shared pieces of the cross-backend suites: harnesses for each backend and
//! the environment variables through which `cargo xtask` hands over servers.

#![forbid(unsafe_code)]

use async_trait::async_trait;
use dlock_core::Locker;
use dlock_testkit::conformance::{Harness, SuiteConfig};

/// Reads a server address that `cargo xtask integration` hands to the suites.
///
/// Panics with the command to run when it is missing: a suite never skips
/// silently because its server was not started.
pub fn server_from_env(variable: &str) -> String {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!(
            "{variable} is not set: this test needs a real server. Run the suites with \
             `cargo xtask integration` (or start servers with `cargo xtask servers` and export what it prints)"
        ),
    }
}

pub mod redis_cases;

/// Where a Redis deployment under test is.
#[derive(Debug, Clone)]
pub enum RedisDeployment {
    /// One server.
    Single(String),
    /// A Cluster, by its seed nodes.
    Cluster(Vec<String>),
    /// A Sentinel group: the sentinels and the master's name.
    Sentinel {
        /// The sentinels' URLs.
        sentinels: Vec<String>,
        /// The name the sentinels monitor.
        master: String,
    },
}

fn list_from_env(variable: &str) -> Vec<String> {
    server_from_env(variable).split(',').map(str::to_owned).collect()
}

impl RedisDeployment {
    /// The single redis-server started by xtask (`DLOCK_TEST_REDIS_URL`).
    pub fn single_from_env() -> Self {
        RedisDeployment::Single(redis_url())
    }

    /// The Cluster started by xtask (`DLOCK_TEST_REDIS_CLUSTER_URLS`).
    pub fn cluster_from_env() -> Self {
        RedisDeployment::Cluster(list_from_env("DLOCK_TEST_REDIS_CLUSTER_URLS"))
    }

    /// The Sentinel group started by xtask (`DLOCK_TEST_REDIS_SENTINEL_URLS`,
    /// `DLOCK_TEST_REDIS_SENTINEL_MASTER`).
    pub fn sentinel_from_env() -> Self {
        RedisDeployment::Sentinel {
            sentinels: list_from_env("DLOCK_TEST_REDIS_SENTINEL_URLS"),
            master: server_from_env("DLOCK_TEST_REDIS_SENTINEL_MASTER"),
        }
    }

    /// Settings for a backend on this deployment.
    pub fn builder(&self) -> dlock_redis::RedisBackendBuilder {
        match self {
            RedisDeployment::Single(url) => dlock_redis::RedisBackend::builder(url),
            RedisDeployment::Cluster(urls) => dlock_redis::RedisBackend::cluster_builder(urls),
            RedisDeployment::Sentinel { sentinels, master } => {
                dlock_redis::RedisBackend::sentinel_builder(sentinels, master)
            }
        }
    }

    /// A backend with default settings.
    pub async fn connect(&self) -> Result<dlock_redis::RedisBackend, dlock_core::LockError> {
        self.builder().connect().await
    }

    /// The deployment with every URL's authority replaced by `user:password@host:port`
    /// (for a Sentinel group, the credentials go to the master through the builder).
    pub fn builder_as(&self, user: &str, password: &str) -> dlock_redis::RedisBackendBuilder {
        let with = |url: &String| {
            let address = url.trim_start_matches("redis://");
            format!("redis://{user}:{password}@{address}")
        };
        match self {
            RedisDeployment::Single(url) => dlock_redis::RedisBackend::builder(&with(url)),
            RedisDeployment::Cluster(urls) => {
                dlock_redis::RedisBackend::cluster_builder(urls.iter().map(with))
            }
            RedisDeployment::Sentinel { .. } => self.builder().credentials(Some(user), password),
        }
    }

    /// A raw connection to the deployment for arranging and inspecting
    /// server state (Cluster: routed by key).
    pub async fn admin(&self) -> Admin {
        match self {
            RedisDeployment::Single(url) => Admin::Node(node_connection(url).await),
            RedisDeployment::Cluster(urls) => Admin::Cluster(
                redis::cluster::ClusterClient::new(urls.clone())
                    .expect("cluster URLs")
                    .get_async_connection()
                    .await
                    .expect("admin connection to the cluster"),
            ),
            RedisDeployment::Sentinel { sentinels, master } => {
                let mut sentinel = node_connection(&sentinels[0]).await;
                let (host, port): (String, u16) = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(master)
                    .query_async(&mut sentinel)
                    .await
                    .expect("ask a sentinel for the master");
                Admin::Node(node_connection(&format!("redis://{host}:{port}")).await)
            }
        }
    }

    /// Every node an ACL user must be created on (Sentinel: master only, it replicates).
    pub async fn acl_targets(&self) -> Vec<Admin> {
        match self {
            RedisDeployment::Cluster(urls) => {
                let mut nodes = Vec::new();
                for url in urls {
                    nodes.push(Admin::Node(node_connection(url).await));
                }
                nodes
            }
            _ => vec![self.admin().await],
        }
    }
}

async fn node_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("test server URL")
        .get_multiplexed_async_connection()
        .await
        .expect("admin connection")
}

/// A raw connection for tests: one node, or a Cluster routed by key.
#[derive(Clone)]
pub enum Admin {
    /// One server.
    Node(redis::aio::MultiplexedConnection),
    /// A Cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Admin {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Admin::Node(connection) => connection.req_packed_command(cmd),
            Admin::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Admin::Node(connection) => connection.req_packed_commands(cmd, offset, count),
            Admin::Cluster(connection) => connection.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Admin::Node(connection) => connection.get_db(),
            Admin::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The URL of the single redis-server started by xtask.
pub fn redis_url() -> String {
    server_from_env("DLOCK_TEST_REDIS_URL")
}

/// The conformance harness for [`dlock_redis::RedisBackend`] on real
/// servers: every locker is a new backend (its own connections), like
/// another process.
pub struct RedisHarness {
    deployment: RedisDeployment,
    names: dlock_redis::RedisBackend,
    admin: Admin,
}

impl RedisHarness {
    /// A harness on the single server named by `DLOCK_TEST_REDIS_URL`.
    pub async fn from_env() -> Self {
        Self::new(RedisDeployment::single_from_env()).await
    }

    /// A harness on `deployment`.
    pub async fn new(deployment: RedisDeployment) -> Self {
        let names = deployment.connect().await.expect("connect the harness backend");
        let admin = deployment.admin().await;
        RedisHarness {
            deployment,
            names,
            admin,
        }
    }

    /// Where the servers are.
    pub fn deployment(&self) -> &RedisDeployment {
        &self.deployment
    }

    /// The backend used for key names (and usable as a client).
    pub fn backend(&self) -> &dlock_redis::RedisBackend {
        &self.names
    }

    /// A raw connection for arranging and inspecting server state.
    pub fn admin(&self) -> Admin {
        self.admin.clone()
    }
}

#[async_trait]
impl Harness for RedisHarness {
    async fn locker(&self) -> Locker {
        // Waiters renew their places every 10 s, so that only a release
        // notification can wake one within the suite's wake bound.
        let backend = self
            .deployment
            .builder()
            .waiter_renewal(std::time::Duration::from_secs(10))
            .connect()
            .await
            .expect("connect a client backend");
        Locker::new(backend)
    }

    async fn force_expire(&self, key: &str) {
        let _: i64 = redis::cmd("DEL")
            .arg(self.names.lock_key(key))
            .query_async(&mut self.admin())
            .await
            .expect("DEL the lock key");
    }

    async fn leftovers(&self, key: &str) -> usize {
        let present: i64 = redis::cmd("EXISTS")
            .arg(self.names.lock_key(key))
            .arg(self.names.line_key(key))
            .arg(self.names.places_key(key))
            .query_async(&mut self.admin())
            .await
            .expect("EXISTS the lock and line keys");
        usize::try_from(present).unwrap_or(usize::MAX)
    }

    fn config(&self) -> SuiteConfig {
        // A release hands the lock to the first waiter in line.
        SuiteConfig::default().fifo(true)
    }
}

/// The URLs of the independent redis-servers xtask starts for Redlock
/// (`DLOCK_TEST_REDLOCK_URLS`).
pub fn redlock_urls() -> Vec<String> {
    list_from_env("DLOCK_TEST_REDLOCK_URLS")
}

/// The conformance harness for [`dlock_redis::RedlockBackend`] over
/// independent servers: every locker is a new backend.
pub struct RedlockHarness {
    urls: Vec<String>,
    names: dlock_redis::RedisBackend,
    nodes: Vec<redis::aio::MultiplexedConnection>,
}

impl RedlockHarness {
    /// A harness on the servers named by `DLOCK_TEST_REDLOCK_URLS`.
    pub async fn from_env() -> Self {
        Self::new(redlock_urls()).await
    }

    /// A harness on the servers at `urls`.
    pub async fn new(urls: Vec<String>) -> Self {
        let names = dlock_redis::RedisBackend::connect(&urls[0])
            .await
            .expect("connect for key names");
        let mut nodes = Vec::new();
        for url in &urls {
            nodes.push(node_connection(url).await);
        }
        RedlockHarness { urls, names, nodes }
    }

    /// The node URLs.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// A backend for key names (the same prefix as the Redlock backends).
    pub fn names(&self) -> &dlock_redis::RedisBackend {
        &self.names
    }

    /// Raw connections to every node.
    pub fn nodes(&self) -> Vec<redis::aio::MultiplexedConnection> {
        self.nodes.clone()
    }

    /// How many nodes hold the lock key for `key`.
    pub async fn holders(&self, key: &str) -> usize {
        let mut holders = 0;
        for mut node in self.nodes() {
            let present: i64 = redis::cmd("EXISTS")
                .arg(self.names.lock_key(key))
                .query_async(&mut node)
                .await
                .expect("EXISTS the lock key");
            holders += usize::try_from(present).unwrap_or(0);
        }
        holders
    }
}

#[async_trait]
impl Harness for RedlockHarness {
    async fn locker(&self) -> Locker {
        let backend = dlock_redis::RedlockBackend::connect(&self.urls)
            .await
            .expect("connect a Redlock backend");
        Locker::new(backend)
    }

    async fn force_expire(&self, key: &str) {
        for mut node in self.nodes() {
            let _: i64 = redis::cmd("DEL")
                .arg(self.names.lock_key(key))
                .query_async(&mut node)
                .await
                .expect("DEL the lock key");
        }
    }

    async fn leftovers(&self, key: &str) -> usize {
        self.holders(key).await
    }

    fn config(&self) -> SuiteConfig {
        SuiteConfig::default()
    }
}

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
    }
}

/// A private certificate authority and a server certificate for
/// `localhost` / `127.0.0.1`, written to a temp dir (removed on drop).
pub struct TestCertificates {
    /// The authority's certificate (PEM), for clients to trust.
    pub ca_pem: String,
    /// The authority's certificate file.
    pub ca_file: std::path::PathBuf,
    /// The server's certificate file (PEM).
    pub cert_file: std::path::PathBuf,
    /// The server's private key file (PEM).
    pub key_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl TestCertificates {
    /// Creates the authority and the server certificate.
    pub fn create() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .expect("server params")
            .signed_by(&server_key, &ca, &ca_key)
            .expect("server certificate");
        let dir = tempfile::Builder::new()
            .prefix("dlock-certs-")
            .tempdir()
            .expect("temp dir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write a certificate file");
            path
        };
        TestCertificates {
            ca_pem: ca.pem(),
            ca_file: write("ca.pem", &ca.pem()),
            cert_file: write("server.pem", &server.pem()),
            key_file: write("server.key", &server_key.serialize_pem()),
            _dir: dir,
        }
    }
}

/// Asserts that `connecting` ends in [`dlock_core::LockError::Unavailable`]
/// (naming the cause, not hanging) within `limit`, and returns its message.
pub async fn assert_unavailable_within<T: std::fmt::Debug>(
    limit: std::time::Duration,
    connecting: impl std::future::Future<Output = Result<T, dlock_core::LockError>>,
) -> String {
    let began = std::time::Instant::now();
    let outcome = connecting.await;
    let took = began.elapsed();
    match outcome {
        Err(error @ dlock_core::LockError::Unavailable { .. }) => {
            assert!(took < limit, "Unavailable only after {took:?} (limit {limit:?})");
            error.to_string()
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// A URL on a loopback port that was free a moment ago: nothing listens there.
pub fn unused_address() -> String {
    let port = dlock_servers::free_port().expect("a free port");
    format!("127.0.0.1:{port}")
}

/// Polls the redis-server on `port` until a waiter stands in the line
/// `line_key` and a backend listens for hand-overs; false if not within
/// `limit`.
pub async fn in_line_within(port: u16, line_key: &str, limit: std::time::Duration) -> bool {
    let began = std::time::Instant::now();
    while began.elapsed() < limit {
        let in_line = dlock_servers::redis::command(port, &["LLEN", line_key])
            .map(dlock_servers::redis::Reply::text)
            .is_ok_and(|length| length.trim() != "0");
        let listening = dlock_servers::redis::command(port, &["PUBSUB", "CHANNELS", "dlock:client:*"])
            .map(dlock_servers::redis::Reply::text)
            .is_ok_and(|channels| !channels.trim().is_empty());
        if in_line && listening {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}
