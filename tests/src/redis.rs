//! Redis deployments under test and their harnesses (single, Sentinel,
//! Cluster, Redlock).

use async_trait::async_trait;
use dlock_core::Locker;
use dlock_testkit::conformance::{Harness, SuiteConfig};

use crate::{list_from_env, server_from_env};

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
        // Redlock offers the mutex only: the checks of other kinds assert
        // its typed refusal.
        SuiteConfig::default()
            .semaphores(false)
            .read_write(false)
            .elections(false)
    }
}
