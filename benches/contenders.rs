//! The contenders: dlock on each backend, the floor (the same round trips
//! with the raw client and no library) and the peers from crates.io, each
//! doing one acquire + release cycle on its own key; and the interleaved
//! timing of their cycles.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use dlock_redis::Locker;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::Script;
use redis::aio::MultiplexedConnection;

use crate::Result;
use crate::stats::Samples;

/// The floor's acquire: what dlock's script must do at least (set with
/// expiry if absent, bump the fencing counter), nothing more.
pub(crate) static FLOOR_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return redis.call('PTTL', KEYS[1])
",
    )
});

/// The owner value the floor writes.
pub(crate) const OWNER: &str = "0123456789abcdef0123456789abcdef";

/// The floor's release: owner-checked delete and a release notification.
pub(crate) static FLOOR_RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '')
  return 1
end
return 0
",
    )
});

#[derive(Clone)]
pub(crate) enum Contender {
    /// The raw redis client: one EVALSHA to acquire, one to release.
    FloorRedis(MultiplexedConnection),
    /// The raw redis client without a fencing counter: a native `SET NX PX`
    /// to acquire (as rslock does), the floor's release script. No lock
    /// that hands out fencing tokens can do less; scenario 2 reports it to
    /// show what the counter costs.
    UnfencedFloor(MultiplexedConnection),
    /// The raw redis client on N nodes: the same two EVALSHAs sent to every
    /// node at once; the acquire is done when a majority answered, the
    /// release when every node did (as dlock's Redlock release).
    FloorRedlock(Vec<MultiplexedConnection>),
    /// A dlock locker on any backend: `try_lock` + `release`.
    Dlock(Locker),
    /// A dlock locker's read lock: `read_lock(key).try_lock()` + `release`.
    DlockRead(Locker),
    /// The raw etcd client: the same transaction dlock sends (put the owner
    /// token if absent, with a warm lease, and read the queue head), then a
    /// delete.
    FloorEtcd { client: etcd_client::Client, lease: i64 },
    /// etcd's own lock service with a warm lease: `lock` + `unlock`.
    EtcdLockService { client: etcd_client::Client, lease: i64 },
    /// rslock at its defaults: `lock` + `unlock` (one or N nodes).
    Rslock(rslock::LockManager),
    /// redsync at its defaults: `lock` + `unlock`, a blocking client (one
    /// new connection per command), called on the blocking pool as an
    /// async program would.
    Redsync(Arc<redsync::Redsync<redsync::RedisInstance>>),
    /// distributed-lock's Redis backend at its defaults: `try_acquire` + `release`.
    DistributedLock(Arc<distributed_lock_redis::RedisLockProvider>),
    /// distributed-lock's reader-writer lock at its defaults:
    /// `try_acquire_read` + `release`.
    DistributedLockRead(Arc<distributed_lock_redis::RedisLockProvider>),
}

/// The three peers on the servers at `urls` (one URL: a single server).
pub(crate) async fn peers(urls: &[String]) -> Result<Vec<(&'static str, Contender)>> {
    let instances = urls
        .iter()
        .map(|url| redsync::RedisInstance::new(url.as_str()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let provider = distributed_lock_redis::RedisLockProvider::builder()
        .urls(urls)
        .build()
        .await?;
    Ok(vec![
        (
            "rslock",
            Contender::Rslock(rslock::LockManager::new(urls.to_vec())),
        ),
        (
            "redsync",
            Contender::Redsync(Arc::new(redsync::Redsync::new(instances))),
        ),
        ("distributed-lock", Contender::DistributedLock(Arc::new(provider))),
    ])
}

impl Contender {
    pub(crate) async fn cycle(&mut self, key: &str) -> Result {
        match self {
            Contender::FloorRedis(connection) => {
                let mut ignored = Samples::default();
                floor_cycles(connection, key, 1, &mut ignored, &mut Samples::default()).await
            }
            Contender::Dlock(locker) => {
                locker.try_lock(key).await?.release().await?;
                Ok(())
            }
            Contender::DlockRead(locker) => {
                locker.read_lock(key).try_lock().await?.release().await?;
                Ok(())
            }
            Contender::UnfencedFloor(connection) => {
                let mut connection = connection.clone();
                let lock_key = format!("floor:{{{key}}}");
                let taken: Option<String> = redis::cmd("SET")
                    .arg(&lock_key)
                    .arg(OWNER)
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut connection)
                    .await?;
                if taken.is_none() {
                    return Err("the unfenced floor found its key held".into());
                }
                floor_release(&mut connection, &lock_key, &format!("floor:{{{key}}}:released")).await
            }
            Contender::FloorRedlock(connections) => {
                let lock_key = format!("floor:{{{key}}}");
                let fence_key = format!("floor:{{{key}}}:fence");
                let mut call = FLOOR_ACQUIRE.key(&lock_key);
                call.key(&fence_key).arg(OWNER).arg(30_000);
                on_nodes(connections, &call, connections.len() / 2 + 1).await?;
                // dlock's release waits for every node, so the floor's does too.
                let mut call = FLOOR_RELEASE.key(&lock_key);
                call.arg(OWNER).arg("floor-released");
                on_nodes(connections, &call, connections.len()).await
            }
            Contender::FloorEtcd { client, lease } => {
                let name = format!("/floor/{key}/0123456789abcdef0123456789abcdef");
                let txn = etcd_client::Txn::new()
                    .when([etcd_client::Compare::create_revision(
                        name.as_str(),
                        etcd_client::CompareOp::Equal,
                        0,
                    )])
                    .and_then([
                        etcd_client::TxnOp::put(
                            name.as_str(),
                            OWNER,
                            Some(etcd_client::PutOptions::new().with_lease(*lease)),
                        ),
                        etcd_client::TxnOp::get(
                            format!("/floor/{key}/"),
                            Some(
                                etcd_client::GetOptions::new()
                                    .with_prefix()
                                    .with_sort(
                                        etcd_client::SortTarget::Create,
                                        etcd_client::SortOrder::Ascend,
                                    )
                                    .with_limit(1)
                                    .with_keys_only(),
                            ),
                        ),
                    ]);
                client.txn(txn).await?;
                client.delete(name, None).await?;
                Ok(())
            }
            Contender::EtcdLockService { client, lease } => {
                let locked = client
                    .lock(
                        format!("/service/{key}"),
                        Some(etcd_client::LockOptions::new().with_lease(*lease)),
                    )
                    .await?;
                client.unlock(locked.key().to_vec()).await?;
                Ok(())
            }
            Contender::Rslock(manager) => {
                let lock = manager.lock(key, PEER_TTL).await?;
                manager.unlock(&lock).await;
                Ok(())
            }
            Contender::Redsync(redsync) => {
                let (redsync, key) = (Arc::clone(redsync), key.to_owned());
                tokio::task::spawn_blocking(move || -> Result {
                    let lock = redsync.lock(&key, PEER_TTL)?;
                    redsync.unlock(&lock)?;
                    Ok(())
                })
                .await?
            }
            Contender::DistributedLock(provider) => {
                use distributed_lock_core::prelude::*;
                let handle = provider
                    .create_lock(key)
                    .try_acquire()
                    .await?
                    .ok_or("distributed-lock: the uncontended key was held")?;
                handle.release().await?;
                Ok(())
            }
            Contender::DistributedLockRead(provider) => {
                use distributed_lock_core::prelude::*;
                let handle = provider
                    .create_reader_writer_lock(key)
                    .try_acquire_read()
                    .await?
                    .ok_or("distributed-lock: the uncontended key was held")?;
                handle.release().await?;
                Ok(())
            }
        }
    }
}

/// Sends `call` to every node at once; done when `needed` nodes answered
/// (the other answers are not waited for).
pub(crate) async fn on_nodes(
    connections: &[MultiplexedConnection],
    call: &redis::ScriptInvocation<'_>,
    needed: usize,
) -> Result {
    let mut answers: FuturesUnordered<_> = connections
        .iter()
        .map(|connection| {
            let mut connection = connection.clone();
            async move { call.invoke_async::<i64>(&mut connection).await }
        })
        .collect();
    for _ in 0..needed {
        answers.next().await.ok_or("a node did not answer")??;
    }
    Ok(())
}

/// The TTL the peers are asked for (dlock's default is 30 s too).
pub(crate) const PEER_TTL: Duration = Duration::from_secs(30);

/// Runs the contenders' cycles interleaved (round by round, alternating
/// who goes first) so that drift in the machine's load hits all alike.
pub(crate) async fn interleaved(
    contenders: &mut [Contender],
    key: &str,
    cycles: usize,
    rounds: usize,
) -> Result<Vec<Samples>> {
    let mut samples: Vec<Samples> = contenders.iter().map(|_| Samples::default()).collect();
    for contender in contenders.iter_mut() {
        for _ in 0..100 {
            contender.cycle(key).await?; // warm-up: scripts, connections, sessions
        }
    }
    let per_round = cycles / rounds;
    for round in 0..rounds {
        let count = contenders.len();
        for turn in 0..count {
            let index = (turn + round) % count;
            let timed = timed_cycles(&mut contenders[index], key, per_round).await?;
            samples[index].extend(timed);
        }
    }
    Ok(samples)
}

/// `count` cycles of `contender` on `key`, each timed.
pub(crate) async fn timed_cycles(contender: &mut Contender, key: &str, count: usize) -> Result<Samples> {
    let mut samples = Samples::default();
    for _ in 0..count {
        let started = Instant::now();
        contender.cycle(key).await?;
        samples.push(started.elapsed());
    }
    Ok(samples)
}

/// A lease for the etcd floor and lock service, long enough for any run
/// (the cluster is stopped after it anyway).
pub(crate) async fn warm_lease(client: &etcd_client::Client) -> Result<i64> {
    Ok(client.clone().lease_grant(600, None).await?.id())
}

pub(crate) async fn floor_connection(url: &str) -> Result<MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// `count` raw cycles: one EVALSHA to acquire, one to release.
pub(crate) async fn floor_cycles(
    connection: &MultiplexedConnection,
    key: &str,
    count: usize,
    cycles: &mut Samples,
    acquires: &mut Samples,
) -> Result {
    let mut connection = connection.clone();
    let lock_key = format!("floor:{{{key}}}");
    let fence_key = format!("floor:{{{key}}}:fence");
    let channel = format!("floor:{{{key}}}:released");
    for _ in 0..count {
        let started = Instant::now();
        let _token: i64 = FLOOR_ACQUIRE
            .key(&lock_key)
            .key(&fence_key)
            .arg(OWNER)
            .arg(30_000)
            .invoke_async(&mut connection)
            .await?;
        acquires.push(started.elapsed());
        floor_release(&mut connection, &lock_key, &channel).await?;
        cycles.push(started.elapsed());
    }
    Ok(())
}

/// The floor's release of `lock_key`, which must find the floor's lock.
pub(crate) async fn floor_release(
    connection: &mut MultiplexedConnection,
    lock_key: &str,
    channel: &str,
) -> Result {
    let released: i64 = FLOOR_RELEASE
        .key(lock_key)
        .arg(OWNER)
        .arg(channel)
        .invoke_async(connection)
        .await?;
    if released != 1 {
        return Err(format!("the floor's release found no lock at {lock_key}").into());
    }
    Ok(())
}

/// One round trip: the median of 1 000 floor acquires on one Redis (the base
/// of the hand-off ratios).
pub(crate) async fn round_trip(url: &str) -> Result<Duration> {
    let connection = floor_connection(url).await?;
    let mut acquires = Samples::default();
    floor_cycles(
        &connection,
        "round-trip",
        1_000,
        &mut Samples::default(),
        &mut acquires,
    )
    .await?;
    Ok(acquires.median())
}
