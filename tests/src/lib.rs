//! Shared pieces of the cross-backend suites: harnesses for each backend and
//! the environment variables through which `cargo xtask` hands over servers.

#![forbid(unsafe_code)]

use async_trait::async_trait;
use dlock_core::Locker;
use dlock_testkit::MemoryBackend;
use dlock_testkit::conformance::{Harness, SuiteConfig};

/// The conformance harness for the in-memory backend: every locker is a
/// clone of one backend, like clients of one server.
#[derive(Debug, Clone, Default)]
pub struct MemoryHarness {
    backend: MemoryBackend,
}

impl MemoryHarness {
    /// A harness over a fresh backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend, for fault injection.
    pub fn backend(&self) -> &MemoryBackend {
        &self.backend
    }
}

#[async_trait]
impl Harness for MemoryHarness {
    async fn locker(&self) -> Locker {
        Locker::new(self.backend.clone())
    }

    async fn force_expire(&self, key: &str) {
        self.backend.force_expire(key);
    }

    async fn leftovers(&self, key: &str) -> usize {
        usize::from(self.backend.is_locked(key))
    }

    fn config(&self) -> SuiteConfig {
        SuiteConfig::default()
    }
}

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

/// The URL of the single redis-server started by xtask.
pub fn redis_url() -> String {
    server_from_env("DLOCK_TEST_REDIS_URL")
}

/// The conformance harness for [`dlock_redis::RedisBackend`] on a real server:
/// every locker is a new backend (its own connections), like another process.
pub struct RedisHarness {
    url: String,
    names: dlock_redis::RedisBackend,
    admin: redis::aio::MultiplexedConnection,
}

impl RedisHarness {
    /// A harness on the server named by `DLOCK_TEST_REDIS_URL`.
    pub async fn from_env() -> Self {
        Self::new(&redis_url()).await
    }

    /// A harness on the server at `url`.
    pub async fn new(url: &str) -> Self {
        let names = dlock_redis::RedisBackend::connect(url)
            .await
            .expect("connect the harness backend");
        let client = redis::Client::open(url).expect("test server URL");
        let admin = client
            .get_multiplexed_async_connection()
            .await
            .expect("admin connection");
        RedisHarness {
            url: url.to_owned(),
            names,
            admin,
        }
    }

    /// The URL of the server.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The backend used for key names (and usable as a client).
    pub fn backend(&self) -> &dlock_redis::RedisBackend {
        &self.names
    }

    /// A raw connection for arranging and inspecting server state.
    pub fn admin(&self) -> redis::aio::MultiplexedConnection {
        self.admin.clone()
    }
}

#[async_trait]
impl Harness for RedisHarness {
    async fn locker(&self) -> Locker {
        let backend = dlock_redis::RedisBackend::connect(&self.url)
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
            .query_async(&mut self.admin())
            .await
            .expect("EXISTS the lock key");
        usize::try_from(present).unwrap_or(usize::MAX)
    }

    fn config(&self) -> SuiteConfig {
        SuiteConfig::default()
    }
}
