//! The real servers the integration suites share, and the environment
//! variables that hand their addresses to the tests. Fault tests start
//! their own deployments (through `dlock-servers` too), so that killing a
//! server harms no other test.

use std::io::BufRead;

use dlock_servers::ServerProcess;
use dlock_servers::etcd::EtcdCluster;
use dlock_servers::redis::{self, RedisCluster, RedisSentinel, SENTINEL_MASTER_NAME};

use crate::Result;
use crate::deps::{self, Tool};

/// The system programs the servers below and the suites that use them need.
pub(crate) const NEEDED: &[Tool] = &[
    deps::REDIS_SERVER,
    deps::REDIS_CLI,
    deps::ETCD,
    deps::ETCDCTL,
    deps::SCRIPT,
];

/// The servers of one run; all are stopped when this is dropped.
#[derive(Debug)]
pub(crate) struct Servers {
    redis: ServerProcess,
    cluster: RedisCluster,
    sentinel: RedisSentinel,
    redlock: Vec<ServerProcess>,
    etcd: EtcdCluster,
}

impl Servers {
    /// The variables that tell the suites where the servers are (names as
    /// in `dlock_tests::env`).
    pub(crate) fn environment(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DLOCK_TEST_REDIS_URL", self.redis_url()),
            ("DLOCK_TEST_REDIS_CLUSTER_URLS", self.cluster.urls().join(",")),
            (
                "DLOCK_TEST_REDIS_SENTINEL_URLS",
                self.sentinel.sentinel_urls().join(","),
            ),
            (
                "DLOCK_TEST_REDIS_SENTINEL_MASTER",
                SENTINEL_MASTER_NAME.to_owned(),
            ),
            ("DLOCK_TEST_REDLOCK_URLS", self.redlock_urls().join(",")),
            ("DLOCK_TEST_ETCD_ENDPOINTS", self.etcd_endpoints().join(",")),
        ]
    }

    /// The URL of the single redis-server.
    pub(crate) fn redis_url(&self) -> String {
        format!("{}/0", redis::url(self.redis.port()))
    }

    /// The etcd cluster's client endpoints.
    pub(crate) fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd.endpoints()
    }

    /// The URLs of the independent Redlock nodes.
    pub(crate) fn redlock_urls(&self) -> Vec<String> {
        self.redlock.iter().map(|node| redis::url(node.port())).collect()
    }

    /// Prints the tail of every server's log (after a failed suite).
    pub(crate) fn dump_logs(&self) {
        eprintln!("{}", self.redis.log_tail());
        eprintln!("{}", self.cluster.log_tails());
        eprintln!("{}", self.sentinel.log_tails());
        for node in &self.redlock {
            eprintln!("{}", node.log_tail());
        }
        eprintln!("{}", self.etcd.log_tails());
    }
}

/// Starts every server the suites need.
pub(crate) fn start_all() -> Result<Servers> {
    Ok(Servers {
        redis: redis::start_server("redis-server", &[])?,
        cluster: RedisCluster::start(3)?,
        sentinel: RedisSentinel::start()?,
        redlock: redis::start_independent(5)?,
        etcd: EtcdCluster::start(3)?,
    })
}

/// `cargo xtask servers`: start everything, print the environment, wait for Enter.
pub(crate) fn interactive() -> Result {
    deps::ensure(NEEDED)?;
    let servers = start_all()?;
    for (name, value) in servers.environment() {
        println!("export {name}={value}");
    }
    println!("# servers are running; press Enter to stop them");
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    drop(servers);
    Ok(())
}
