//! The deployments a chaos run starts, how clients reach them, and what the
//! nemesis can do to them.

use std::net::SocketAddr;
use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_etcd::EtcdBackend;
use dlock_redis::{RedisBackend, RedlockBackend};
use dlock_servers::etcd::EtcdCluster;
use dlock_servers::redis::{self, RedisCluster, RedisSentinel};
use dlock_servers::{Result, ServerProcess};
use dlock_testkit::FaultProxy;
use tokio::runtime::Runtime;

/// A deployment under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    Single,
    Sentinel,
    Cluster,
    Redlock,
    Etcd,
}

impl Kind {
    pub(crate) const ALL: [Kind; 5] = [
        Kind::Single,
        Kind::Sentinel,
        Kind::Cluster,
        Kind::Redlock,
        Kind::Etcd,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Single => "single Redis",
            Kind::Sentinel => "Redis Sentinel",
            Kind::Cluster => "Redis Cluster",
            Kind::Redlock => "Redlock x5",
            Kind::Etcd => "etcd x3",
        }
    }

    /// Whether the deployment offers the kinds beyond the mutex, the
    /// semaphore and the read-write lock (Redlock refuses them).
    pub(crate) fn offers_shared_kinds(self) -> bool {
        self != Kind::Redlock
    }

    /// The fault classes that apply, in the order they run (a failover that
    /// cannot be undone goes last). Sentinel and Cluster clients learn the
    /// servers' addresses from the servers, so a proxy cannot sit in their
    /// path: network faults are run on the other three.
    pub(crate) fn faults(self) -> &'static [Fault] {
        match self {
            Kind::Single => &[
                Fault::None,
                Fault::ServerKill,
                Fault::Blackhole,
                Fault::Latency,
                Fault::ClientPause,
            ],
            Kind::Sentinel => &[Fault::None, Fault::ClientPause, Fault::Failover],
            Kind::Cluster => &[Fault::None, Fault::ClientPause, Fault::Failover],
            Kind::Redlock => &[
                Fault::None,
                Fault::MinorityLoss,
                Fault::MajorityLoss,
                Fault::Blackhole,
                Fault::Latency,
                Fault::ClientPause,
            ],
            Kind::Etcd => &[
                Fault::None,
                Fault::LeaderKill,
                Fault::Blackhole,
                Fault::Latency,
                Fault::ClientPause,
            ],
        }
    }
}

/// One class of fault the nemesis injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    None,
    /// The server is killed and restarted (with its append-only file).
    ServerKill,
    /// The master is killed; a replica takes over.
    Failover,
    /// 2 of 5 Redlock nodes are killed, and restart empty after the TTL.
    MinorityLoss,
    /// 3 of 5 Redlock nodes are killed, and restart empty after the TTL.
    MajorityLoss,
    /// The etcd leader is killed and restarted.
    LeaderKill,
    /// One client's traffic is held back (a partition), then its connections are cut.
    Blackhole,
    /// One client's traffic is slowed by 300 ms per chunk.
    Latency,
    /// A holder's whole process stalls for more than the TTL.
    ClientPause,
}

impl Fault {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::ServerKill => "server kill + restart",
            Fault::Failover => "master kill, failover",
            Fault::MinorityLoss => "2 of 5 nodes lost",
            Fault::MajorityLoss => "3 of 5 nodes lost",
            Fault::LeaderKill => "leader kill + restart",
            Fault::Blackhole => "blackhole one client",
            Fault::Latency => "latency spikes, one client",
            Fault::ClientPause => "client pause > TTL",
        }
    }

    pub(crate) fn is_network(self) -> bool {
        matches!(self, Fault::Blackhole | Fault::Latency)
    }
}

/// The running servers of one deployment.
pub(crate) enum Servers {
    Single(ServerProcess),
    Sentinel(RedisSentinel),
    Cluster(RedisCluster),
    Redlock(Vec<ServerProcess>),
    Etcd(EtcdCluster),
}

impl Servers {
    pub(crate) fn start(kind: Kind) -> Result<Servers> {
        Ok(match kind {
            // Kept on disk at every write, so a restart keeps the locks and
            // their fencing counters, as docs/SAFETY.md asks of a lock server.
            Kind::Single => Servers::Single(redis::start_server(
                "redis-chaos",
                &["--appendonly", "yes", "--appendfsync", "always"].map(str::to_owned),
            )?),
            Kind::Sentinel => Servers::Sentinel(RedisSentinel::start()?),
            Kind::Cluster => Servers::Cluster(RedisCluster::start(3)?),
            Kind::Redlock => Servers::Redlock(redis::start_independent(5)?),
            Kind::Etcd => Servers::Etcd(EtcdCluster::start(3)?),
        })
    }

    /// The socket addresses a proxy can stand in front of.
    fn proxyable(&self) -> Vec<SocketAddr> {
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        match self {
            Servers::Single(server) => vec![loopback(server.port())],
            Servers::Redlock(nodes) => nodes.iter().map(|node| loopback(node.port())).collect(),
            Servers::Etcd(cluster) => cluster
                .endpoints()
                .iter()
                .filter_map(|endpoint| endpoint.strip_prefix("http://")?.parse().ok())
                .collect(),
            Servers::Sentinel(_) | Servers::Cluster(_) => Vec::new(),
        }
    }

    /// Starts one proxy per server address, on `network`.
    pub(crate) fn proxies(&self, network: &Runtime) -> Result<Vec<FaultProxy>> {
        self.proxyable()
            .into_iter()
            .map(|address| {
                network
                    .block_on(FaultProxy::start(address))
                    .map_err(|error| format!("starting a proxy to {address}: {error}"))
            })
            .collect()
    }

    /// Where a client connects: directly, or through `proxies`.
    pub(crate) fn client_addresses(&self, proxies: Option<&[FaultProxy]>) -> Target {
        let direct = self.proxyable();
        let addresses: Vec<SocketAddr> = match proxies {
            Some(proxies) => proxies.iter().map(FaultProxy::address).collect(),
            None => direct,
        };
        match self {
            Servers::Single(_) => Target::Single(format!("redis://{}", addresses[0])),
            Servers::Redlock(_) => Target::Redlock(
                addresses
                    .iter()
                    .map(|address| format!("redis://{address}"))
                    .collect(),
            ),
            Servers::Etcd(_) => Target::Etcd(
                addresses
                    .iter()
                    .map(|address| format!("http://{address}"))
                    .collect(),
            ),
            Servers::Sentinel(group) => Target::Sentinel(group.sentinel_urls()),
            Servers::Cluster(cluster) => Target::Cluster(cluster.urls()),
        }
    }

    /// Injects `fault` (server side); returns what `heal` needs to undo it.
    pub(crate) fn inject(&mut self, fault: Fault, rng: &mut fastrand::Rng, ttl: Duration) -> Result {
        match (self, fault) {
            (Servers::Single(server), Fault::ServerKill) => {
                server.kill();
                std::thread::sleep(Duration::from_secs(1));
                server.restart()?;
                redis::wait_ping(server)
            }
            (Servers::Sentinel(group), Fault::Failover) => {
                group.kill_master();
                group.wait_failover()
            }
            (Servers::Cluster(cluster), Fault::Failover) => {
                let key = crate::case::KEYS[rng.usize(..crate::case::KEYS.len())];
                let victim = cluster.master_for(key)?;
                cluster.kill(victim);
                // Polled until a replica serves the key's slot.
                let give_up = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    match cluster.master_for(key) {
                        Ok(now) if now != victim => return Ok(()),
                        _ if std::time::Instant::now() >= give_up => {
                            return Err(format!("no replica took over {key:?}'s slot within 30 s"));
                        }
                        _ => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            }
            (Servers::Redlock(nodes), Fault::MinorityLoss | Fault::MajorityLoss) => {
                let lost = if fault == Fault::MinorityLoss { 2 } else { 3 };
                let first = rng.usize(..nodes.len());
                let chosen: Vec<usize> = (0..lost).map(|step| (first + step) % nodes.len()).collect();
                for &index in &chosen {
                    nodes[index].kill();
                }
                // The delayed-restart rule: an empty node stays out for a TTL.
                std::thread::sleep(ttl + Duration::from_millis(500));
                for &index in &chosen {
                    nodes[index].restart()?;
                    redis::wait_ping(&mut nodes[index])?;
                }
                Ok(())
            }
            (Servers::Etcd(cluster), Fault::LeaderKill) => {
                // Polled: right after a restart a member may not answer its
                // status yet, and then the leader's id matches no member.
                let give_up = std::time::Instant::now() + Duration::from_secs(10);
                let leader = loop {
                    match cluster.leader() {
                        Ok(leader) => break leader,
                        Err(message) if std::time::Instant::now() >= give_up => return Err(message),
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                };
                cluster.kill(leader);
                std::thread::sleep(Duration::from_secs(2));
                cluster.restart(leader)?;
                cluster.wait_healthy()
            }
            _ => Ok(()),
        }
    }
}

/// Where one client connects.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Single(String),
    Sentinel(Vec<String>),
    Cluster(Vec<String>),
    Redlock(Vec<String>),
    Etcd(Vec<String>),
}

impl Target {
    /// A new client (its own connections), as another process would have.
    pub(crate) async fn connect(&self) -> std::result::Result<Locker, LockError> {
        Ok(match self {
            Target::Single(url) => Locker::new(
                RedisBackend::builder(url)
                    .command_timeout(Duration::from_secs(1))
                    .connect()
                    .await?,
            ),
            Target::Sentinel(urls) => Locker::new(
                RedisBackend::sentinel_builder(urls, redis::SENTINEL_MASTER_NAME)
                    .command_timeout(Duration::from_secs(1))
                    .connect()
                    .await?,
            ),
            Target::Cluster(urls) => Locker::new(
                RedisBackend::cluster_builder(urls)
                    .command_timeout(Duration::from_secs(1))
                    .connect()
                    .await?,
            ),
            Target::Redlock(urls) => Locker::new(RedlockBackend::connect(urls).await?),
            Target::Etcd(endpoints) => Locker::new(
                EtcdBackend::builder(endpoints)
                    .request_timeout(Duration::from_secs(1))
                    .connect()
                    .await?,
            ),
        })
    }
}
