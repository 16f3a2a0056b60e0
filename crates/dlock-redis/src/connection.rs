//! The command connection for each deployment, behind one `invoke`.
//!
//! - single server: redis-rs's `ConnectionManager` (one multiplexed
//!   connection that reconnects to the same address);
//! - Cluster: redis-rs's cluster connection (routes by slot, follows
//!   MOVED/ASK, refreshes the slot map after a failover);
//! - Sentinel: one multiplexed connection to the master the sentinels name,
//!   dropped and looked up again when it breaks or the node turned replica.
//!
//! The pub/sub side ([`PubSubSource`]) follows the same deployment.

#[cfg(feature = "sentinel")]
use std::sync::Arc;
#[cfg(feature = "sentinel")]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use redis::aio::{ConnectionManager, PubSub};
#[cfg(feature = "cluster")]
use redis::cluster_async::ClusterConnection;
#[cfg(feature = "sentinel")]
use redis::{AsyncConnectionConfig, aio::MultiplexedConnection, sentinel::SentinelClient};
use redis::{FromRedisValue, RedisResult};

use crate::scripts::ScriptCall;

/// Where lock commands go.
pub(crate) enum Commands {
    Direct(ConnectionManager),
    #[cfg(feature = "cluster")]
    Cluster(ClusterConnection),
    #[cfg(feature = "sentinel")]
    Sentinel(Arc<SentinelMaster>),
}

impl Commands {
    /// Runs a script (EVALSHA, loading it on NOSCRIPT).
    pub(crate) async fn invoke<T: FromRedisValue>(&self, call: &ScriptCall) -> RedisResult<T> {
        match self {
            Commands::Direct(connection) => call.run(&mut connection.clone()).await,
            #[cfg(feature = "cluster")]
            Commands::Cluster(connection) => call.run(&mut connection.clone()).await,
            #[cfg(feature = "sentinel")]
            Commands::Sentinel(master) => master.invoke(call).await,
        }
    }
}

/// The master of a Sentinel-managed group, found through the sentinels.
#[cfg(feature = "sentinel")]
pub(crate) struct SentinelMaster {
    /// Held while looking the master up, so concurrent callers do it once.
    sentinels: tokio::sync::Mutex<SentinelClient>,
    /// The current connection to the master and its generation.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
    generations: AtomicU64,
    config: AsyncConnectionConfig,
}

#[cfg(feature = "sentinel")]
impl SentinelMaster {
    pub(crate) fn new(sentinels: SentinelClient, config: AsyncConnectionConfig) -> Arc<Self> {
        Arc::new(SentinelMaster {
            sentinels: tokio::sync::Mutex::new(sentinels),
            current: Mutex::new(None),
            generations: AtomicU64::new(0),
            config,
        })
    }

    fn cached(&self) -> Option<(u64, MultiplexedConnection)> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The live master connection, asking the sentinels for the master if
    /// there is none.
    pub(crate) async fn connection(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        if let Some(live) = self.cached() {
            return Ok(live);
        }
        let mut sentinels = self.sentinels.lock().await;
        if let Some(live) = self.cached() {
            return Ok(live); // another caller looked it up meanwhile
        }
        let master = sentinels.async_get_client().await?;
        let connection = master
            .get_multiplexed_async_connection_with_config(&self.config)
            .await?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        *current = Some((generation, connection.clone()));
        Ok((generation, connection))
    }

    /// A client for the current master, for the pub/sub connection.
    pub(crate) async fn master_client(&self) -> RedisResult<redis::Client> {
        self.sentinels.lock().await.async_get_client().await
    }

    async fn invoke<T: FromRedisValue>(&self, call: &ScriptCall) -> RedisResult<T> {
        let (generation, mut connection) = self.connection().await?;
        let result = call.run(&mut connection).await;
        if let Err(error) = &result {
            if master_may_have_moved(error) {
                self.forget(generation);
            }
        }
        result
    }

    /// Drops connection `generation` so that the next command asks the
    /// sentinels again (unless a newer connection already replaced it).
    fn forget(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|(live, _)| *live == generation) {
            tracing::debug!(
                "the Sentinel master connection failed; the next command looks the master up again"
            );
            *current = None;
        }
    }
}

/// Errors after which the node we talk to may no longer be the master: the
/// connection broke, it timed out, or the node now is a read-only replica.
#[cfg(feature = "sentinel")]
fn master_may_have_moved(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly | redis::ServerErrorKind::MasterDown)
        )
}

/// Where the shared pub/sub connection connects.
pub(crate) enum PubSubSource {
    /// Fixed nodes, tried in turn: the one server, or the seed nodes of a
    /// Cluster (a Cluster forwards classic PUBLISH to every node, so any
    /// node hears every release).
    Nodes {
        clients: Vec<redis::Client>,
        next: Mutex<usize>,
    },
    /// The master of a Sentinel group, looked up on every (re)connect.
    #[cfg(feature = "sentinel")]
    Sentinel(Arc<SentinelMaster>),
}

impl PubSubSource {
    pub(crate) fn nodes(clients: Vec<redis::Client>) -> Self {
        PubSubSource::Nodes {
            clients,
            next: Mutex::new(0),
        }
    }

    /// Opens a pub/sub connection. For fixed nodes, it starts with the node
    /// after the last one that failed.
    pub(crate) async fn open(&self) -> RedisResult<PubSub> {
        match self {
            PubSubSource::Nodes { clients, next } => {
                let start = *next.lock().unwrap_or_else(PoisonError::into_inner);
                let mut last_error = None;
                for offset in 0..clients.len() {
                    let index = (start + offset) % clients.len();
                    match clients[index].get_async_pubsub().await {
                        Ok(pubsub) => {
                            *next.lock().unwrap_or_else(PoisonError::into_inner) = index;
                            return Ok(pubsub);
                        }
                        Err(error) => last_error = Some(error),
                    }
                }
                *next.lock().unwrap_or_else(PoisonError::into_inner) = start + 1;
                Err(last_error.unwrap_or_else(|| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "no Redis node to subscribe on",
                    ))
                }))
            }
            #[cfg(feature = "sentinel")]
            PubSubSource::Sentinel(master) => master.master_client().await?.get_async_pubsub().await,
        }
    }
}
