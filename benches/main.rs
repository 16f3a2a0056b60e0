//! `cargo xtask bench`: dlock against the floor (the same round trips with
//! the raw redis client) on the same server, in one run, interleaved, as
//! ratios. Reads the servers from `DLOCK_BENCH_*` variables (xtask starts them).
//!
//! Scenarios so far (numbered as in the benchmark issue): 1. the uncontended
//! cycle on one Redis; 3. the contended hand-off (8 clients, one key, 1 ms
//! of work each); 4. Redlock on 5 nodes against dlock on one; 5. etcd with a
//! warm session against the raw transaction and etcd's lock service; 6. the
//! watchdog holding many guards; 2. throughput of 64 tasks on 64 keys.
//!
//! The peers from crates.io run at their default settings on the same
//! servers in the same run: `rslock` (Redlock, also on one node),
//! `redsync` (blocking, so its calls go to Tokio's blocking pool) and
//! `distributed-lock`'s Redis backend.
//!
//! `DLOCK_BENCH_PROFILE=throughput` runs only scenario 2 for 15 s, for a
//! profiler to attach to, with dlock or with `DLOCK_BENCH_CONTENDER=floor`
//! or `rslock` (comparing instructions per cycle under a profiler is steadier
//! than CPU time on a shared machine); `DLOCK_BENCH_PROFILE=handoff` only dlock's
//! scenario 3; `DLOCK_BENCH_PROFILE=throughput-vs` scenario 2 for the two
//! floors, dlock and rslock; `DLOCK_BENCH_PROFILE=etcd-growth` scenario 5's cycle,
//! floor and dlock, in 8 batches of 1 000 on one key (does the cycle slow
//! down as acquisitions of a key accumulate?).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dlock_redis::{Locker, RedisBackend, RedlockBackend};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::Script;
use redis::aio::MultiplexedConnection;

mod plot;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The floor's acquire: what dlock's script must do at least (set with
/// expiry if absent, bump the fencing counter), nothing more.
static FLOOR_ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
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
const OWNER: &str = "0123456789abcdef0123456789abcdef";

/// The floor's release: owner-checked delete and a release notification.
static FLOOR_RELEASE: LazyLock<Script> = LazyLock::new(|| {
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

#[derive(Clone, Copy)]
struct Settings {
    quick: bool,
    cycles: usize,
    rounds: usize,
    handoff_for: Duration,
}

#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn percentile(&self, fraction: f64) -> Duration {
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
        sorted[index.min(sorted.len() - 1)]
    }
    fn median(&self) -> Duration {
        self.percentile(0.5)
    }
    fn p99(&self) -> Duration {
        self.percentile(0.99)
    }
}

/// One side of a comparison: does one acquire + release cycle on its own key.
#[derive(Clone)]
enum Contender {
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
}

/// The three peers on the servers at `urls` (one URL: a single server).
async fn peers(urls: &[String]) -> Result<Vec<(&'static str, Contender)>> {
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
    async fn cycle(&mut self, key: &str) -> Result {
        match self {
            Contender::FloorRedis(connection) => {
                let mut ignored = Samples::default();
                floor_cycles(connection, key, 1, &mut ignored, &mut Samples::default()).await
            }
            Contender::Dlock(locker) => {
                locker.try_lock(key).await?.release().await?;
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
        }
    }
}

/// Sends `call` to every node at once; done when `needed` nodes answered
/// (the other answers are not waited for).
async fn on_nodes(
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
const PEER_TTL: Duration = Duration::from_secs(30);

/// Runs the contenders' cycles interleaved (round by round, alternating
/// who goes first) so that drift in the machine's load hits all alike.
async fn interleaved(contenders: &mut [Contender], key: &str, settings: &Settings) -> Result<Vec<Samples>> {
    let mut samples: Vec<Samples> = contenders.iter().map(|_| Samples::default()).collect();
    for contender in contenders.iter_mut() {
        for _ in 0..100 {
            contender.cycle(key).await?; // warm-up: scripts, connections, sessions
        }
    }
    let per_round = settings.cycles / settings.rounds;
    for round in 0..settings.rounds {
        let count = contenders.len();
        for turn in 0..count {
            let index = (turn + round) % count;
            let timed = timed_cycles(&mut contenders[index], key, per_round).await?;
            samples[index].0.extend(timed.0);
        }
    }
    Ok(samples)
}

/// `count` cycles of `contender` on `key`, each timed.
async fn timed_cycles(contender: &mut Contender, key: &str, count: usize) -> Result<Samples> {
    let mut samples = Samples::default();
    for _ in 0..count {
        let started = Instant::now();
        contender.cycle(key).await?;
        samples.0.push(started.elapsed());
    }
    Ok(samples)
}

/// A lease for the etcd floor and lock service, long enough for any run
/// (the cluster is stopped after it anyway).
async fn warm_lease(client: &etcd_client::Client) -> Result<i64> {
    Ok(client.clone().lease_grant(600, None).await?.id())
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| format!("{name} is not set; run `cargo xtask bench`").into())
}

/// A comma-separated list from the environment.
fn env_list(name: &str) -> Result<Vec<String>> {
    Ok(env(name)?.split(',').map(str::to_owned).collect())
}

#[tokio::main]
async fn main() -> Result {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let settings = Settings {
        quick,
        cycles: if quick { 2_000 } else { 20_000 },
        rounds: 10,
        handoff_for: Duration::from_secs(if quick { 2 } else { 10 }),
    };
    let url = env("DLOCK_BENCH_REDIS_URL")?;
    if std::env::var("DLOCK_BENCH_PROFILE").is_ok_and(|only| only == "throughput") {
        // Only scenario 2 for one contender, long enough to attach a profiler.
        let name = std::env::var("DLOCK_BENCH_CONTENDER").unwrap_or_else(|_| "dlock".to_owned());
        let contender = match name.as_str() {
            "dlock" => Contender::Dlock(Locker::new(RedisBackend::connect(&url).await?)),
            "floor" => Contender::FloorRedis(floor_connection(&url).await?),
            "rslock" => Contender::Rslock(rslock::LockManager::new(vec![url.clone()])),
            other => {
                return Err(format!("DLOCK_BENCH_CONTENDER={other}: expected dlock, floor or rslock").into());
            }
        };
        let rate = throughput(|| contender.clone(), 64, Duration::from_secs(15)).await?;
        println!("{name} throughput, 64 tasks on 64 keys: {rate:.0} cycles/s");
        return Ok(());
    }
    if std::env::var("DLOCK_BENCH_PROFILE").is_ok_and(|only| only == "throughput-vs") {
        // Scenario 2 for the floors, dlock and rslock only, 8 slices each.
        let mut admin = floor_connection(&url).await?;
        let contenders = [
            ("floor", Contender::FloorRedis(floor_connection(&url).await?)),
            (
                "unfenced floor",
                Contender::UnfencedFloor(floor_connection(&url).await?),
            ),
            (
                "dlock",
                Contender::Dlock(Locker::new(RedisBackend::connect(&url).await?)),
            ),
            (
                "rslock",
                Contender::Rslock(rslock::LockManager::new(vec![url.clone()])),
            ),
        ];
        for (name, load) in interleaved_loads(&contenders, 8, Duration::from_secs(1), &mut admin).await? {
            println!(
                "{name}: {:.0} cycles/s; CPU per cycle: client {:.1} us, Redis {:.1} us",
                load.rate, load.client_micros, load.server_micros
            );
        }
        return Ok(());
    }
    if std::env::var("DLOCK_BENCH_PROFILE").is_ok_and(|only| only == "handoff") {
        // Only dlock's scenario 3.
        let run = handoff(
            "dlock",
            &url,
            8,
            Duration::from_millis(1),
            Duration::from_secs(10),
        )
        .await?;
        println!(
            "dlock hand-off: {} cycles in 10 s, median gap {:?}, p99 {:?}, hold {:?}, release {:?}, gave up {}, per client {:?}",
            run.cycles,
            run.gaps.median(),
            run.gaps.p99(),
            run.holds.median(),
            run.releases.median(),
            run.gave_up,
            run.per_client
        );
        return Ok(());
    }
    if std::env::var("DLOCK_BENCH_PROFILE").is_ok_and(|only| only == "etcd-growth") {
        let endpoints = env_list("DLOCK_BENCH_ETCD_ENDPOINTS")?;
        let client = etcd_client::Client::connect(&endpoints, None).await?;
        let lease = warm_lease(&client).await?;
        let mut contenders = [
            ("floor", Contender::FloorEtcd { client, lease }),
            (
                "dlock",
                Contender::Dlock(Locker::new(dlock_etcd::EtcdBackend::connect(&endpoints).await?)),
            ),
        ];
        for batch in 1..=8 {
            let mut line = format!("batch {batch} (1 000 cycles each):");
            for (name, contender) in &mut contenders {
                let samples = timed_cycles(contender, "growth", 1_000).await?;
                let _ = write!(line, " {name} median {:?};", samples.median());
            }
            println!("{line}");
        }
        return Ok(());
    }
    let redlock_urls = env_list("DLOCK_BENCH_REDLOCK_URLS")?;
    let etcd_endpoints = env_list("DLOCK_BENCH_ETCD_ENDPOINTS")?;

    let mut table = String::new();
    let _ = writeln!(table, "| scenario | contender | median | p99 | ratio (median) |");
    let _ = writeln!(table, "|---|---|---|---|---|");
    let row = |table: &mut String, scenario: &str, who: &str, samples: &Samples, base: Duration| {
        let _ = writeln!(
            table,
            "| {scenario} | {who} | {:?} | {:?} | {:.2}x |",
            samples.median(),
            samples.p99(),
            samples.median().as_secs_f64() / base.as_secs_f64().max(1e-9)
        );
    };

    // 1. Uncontended cycle on one Redis, and 4. Redlock on 5 nodes; the
    // peers on the same servers, interleaved with the rest.
    let single_peers = peers(std::slice::from_ref(&url)).await?;
    let redlock_peers = peers(&redlock_urls).await?;
    let mut redis = vec![
        Contender::FloorRedis(floor_connection(&url).await?),
        Contender::Dlock(Locker::new(RedisBackend::connect(&url).await?)),
        Contender::Dlock(Locker::new(RedlockBackend::connect(&redlock_urls).await?)),
    ];
    redis.extend(single_peers.iter().map(|(_, contender)| contender.clone()));
    redis.extend(redlock_peers.iter().map(|(_, contender)| contender.clone()));
    let mut redlock_connections = Vec::new();
    for node in &redlock_urls {
        redlock_connections.push(floor_connection(node).await?);
    }
    let floor_redlock = redis.len();
    redis.push(Contender::FloorRedlock(redlock_connections));
    let mut floor_acquire = Samples::default();
    if let Contender::FloorRedis(connection) = &redis[0] {
        floor_cycles(
            connection,
            "round-trip",
            1_000,
            &mut Samples::default(),
            &mut floor_acquire,
        )
        .await?;
    }
    let round_trip = floor_acquire.median();
    let cycles = interleaved(&mut redis, "uncontended", &settings).await?;
    let floor = cycles[0].median();
    const UNCONTENDED: &str = "1. uncontended acquire + release, one Redis";
    row(
        &mut table,
        UNCONTENDED,
        "floor (raw EVALSHA x2)",
        &cycles[0],
        floor,
    );
    row(&mut table, UNCONTENDED, "dlock RedisBackend", &cycles[1], floor);
    for (index, (name, _)) in single_peers.iter().enumerate() {
        row(&mut table, UNCONTENDED, name, &cycles[3 + index], floor);
    }
    const REDLOCK: &str = "4. uncontended cycle, Redlock on 5 nodes (ratio to dlock on one node)";
    row(
        &mut table,
        REDLOCK,
        "floor on 5 nodes (raw EVALSHA x2 to all; acquire at a majority, release at all)",
        &cycles[floor_redlock],
        cycles[1].median(),
    );
    row(
        &mut table,
        REDLOCK,
        "dlock RedlockBackend",
        &cycles[2],
        cycles[1].median(),
    );
    for (index, (name, _)) in redlock_peers.iter().enumerate() {
        row(
            &mut table,
            REDLOCK,
            name,
            &cycles[3 + single_peers.len() + index],
            cycles[1].median(),
        );
    }

    // 5. etcd, warm session.
    let etcd_client = etcd_client::Client::connect(&etcd_endpoints, None).await?;
    let lease = warm_lease(&etcd_client).await?;
    let mut etcd = vec![
        Contender::FloorEtcd {
            client: etcd_client.clone(),
            lease,
        },
        Contender::Dlock(Locker::new(
            dlock_etcd::EtcdBackend::connect(&etcd_endpoints).await?,
        )),
        Contender::EtcdLockService {
            client: etcd_client.clone(),
            lease,
        },
    ];
    let etcd_settings = Settings {
        cycles: settings.cycles / 10,
        ..settings
    };
    let etcd_cycles = interleaved(&mut etcd, "uncontended", &etcd_settings).await?;
    let etcd_floor = etcd_cycles[0].median();
    row(
        &mut table,
        "5. etcd lock + unlock, warm session",
        "floor (raw txn + delete)",
        &etcd_cycles[0],
        etcd_floor,
    );
    row(
        &mut table,
        "5. etcd lock + unlock, warm session",
        "dlock EtcdBackend",
        &etcd_cycles[1],
        etcd_floor,
    );
    row(
        &mut table,
        "5. etcd lock + unlock, warm session",
        "etcd lock service (lock/unlock)",
        &etcd_cycles[2],
        etcd_floor,
    );

    // 3. Contended hand-off, every library with 8 clients of its own.
    const HANDOFF: &str = "3. hand-off, 8 clients on one key, 1 ms hold: release returns -> next holder's acquire returns (ratio to one round trip)";
    let mut handoffs = Vec::new();
    for kind in ["dlock", "rslock", "redsync", "distributed-lock"] {
        let run = handoff(kind, &url, 8, Duration::from_millis(1), settings.handoff_for).await?;
        row(&mut table, HANDOFF, kind, &run.gaps, round_trip);
        handoffs.push((kind, run));
    }

    // 2. Throughput: 64 tasks on 64 keys over one shared client each,
    // interleaved in short slices; the client's and the server's CPU time
    // per cycle show where the time goes.
    let (slices, slice) = if settings.quick {
        (2, Duration::from_millis(500))
    } else {
        (8, Duration::from_secs(1))
    };
    let mut admin = floor_connection(&url).await?;
    let mut shared = vec![
        ("floor", Contender::FloorRedis(floor_connection(&url).await?)),
        (
            "unfenced floor",
            Contender::UnfencedFloor(floor_connection(&url).await?),
        ),
        (
            "dlock",
            Contender::Dlock(Locker::new(RedisBackend::connect(&url).await?)),
        ),
    ];
    shared.extend(single_peers.iter().cloned());
    let throughput_rows = interleaved_loads(&shared, slices, slice, &mut admin).await?;

    // 6. The watchdog at scale.
    let (guards, hold) = if settings.quick {
        (1_000, Duration::from_secs(3))
    } else {
        (10_000, Duration::from_secs(30))
    };
    let scale = watchdog_at_scale(&url, guards, hold).await?;
    let mut summary = format!("floor round trip (one acquire EVALSHA): median {round_trip:?}\n");
    let _ = writeln!(
        summary,
        "Redlock on 5 nodes: dlock {:.2}x the raw 5-node floor, which is itself {:.2}x the one-node floor",
        cycles[2].median().as_secs_f64() / cycles[floor_redlock].median().as_secs_f64().max(1e-9),
        cycles[floor_redlock].median().as_secs_f64() / floor.as_secs_f64().max(1e-9),
    );
    let bar = 0.9 / (0.001 + round_trip.as_secs_f64());
    let _ = writeln!(
        summary,
        "hand-off, 8 clients, {:?} each (bar for dlock: >= 0.9 / (1 ms hold + one round trip) = {bar:.0} cycles/s; \
         the hold is 1 ms on a blocking-pool thread, slept then spun):",
        settings.handoff_for
    );
    for (kind, run) in &handoffs {
        let counts: Vec<String> = run.per_client.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            summary,
            "  {kind}: {:.0} cycles/s, median hand-off {:.2} round trips (p99 {:.2}), gave up {}, acquisitions per client [{}]; \
             medians: hold {:?}, release {:?}",
            run.cycles as f64 / settings.handoff_for.as_secs_f64(),
            run.gaps.median().as_secs_f64() / round_trip.as_secs_f64().max(1e-9),
            run.gaps.p99().as_secs_f64() / round_trip.as_secs_f64().max(1e-9),
            run.gave_up,
            counts.join(", "),
            run.holds.median(),
            run.releases.median(),
        );
    }
    let dlock_rate = throughput_rows
        .iter()
        .find(|(name, _)| *name == "dlock")
        .map_or(0.0, |(_, load)| load.rate);
    let _ = writeln!(
        summary,
        "throughput, 64 tasks on 64 keys, one shared client each, median of {slices} slices of {slice:?}:"
    );
    for (name, load) in &throughput_rows {
        let _ = writeln!(
            summary,
            "  {name}: {:.0} cycles/s (dlock {:.2}x); CPU per cycle: client {:.1} us, Redis {:.1} us",
            load.rate,
            dlock_rate / load.rate.max(1.0),
            load.client_micros,
            load.server_micros,
        );
    }
    let _ = writeln!(
        summary,
        "watchdog at scale: {} guards (TTL 3 s, auto-renewed) held for {:.1?}: {} lost; client memory {:.0} bytes per guard \
         (resident set growth); client CPU {:.0}% of one core; Redis {:.0} commands/s",
        scale.guards,
        scale.held_for,
        scale.lost,
        scale.bytes_per_guard,
        scale.client_cpu * 100.0,
        scale.commands_per_second,
    );
    println!("{table}\n{summary}");
    if settings.quick {
        return Ok(());
    }
    let mut uncontended: Vec<(&str, &Samples)> = vec![("floor", &cycles[0]), ("dlock", &cycles[1])];
    uncontended.extend(
        single_peers
            .iter()
            .zip(&cycles[3..])
            .map(|((name, _), samples)| (*name, samples)),
    );
    let mut redlock_series: Vec<(&str, &Samples)> =
        vec![("floor", &cycles[floor_redlock]), ("dlock", &cycles[2])];
    redlock_series.extend(
        redlock_peers
            .iter()
            .zip(&cycles[3 + single_peers.len()..])
            .map(|((name, _), samples)| (*name, samples)),
    );
    let handoff_series: Vec<(&str, &Samples)> =
        handoffs.iter().map(|(kind, run)| (*kind, &run.gaps)).collect();
    let plot = plot::latency_svg(&[
        ("1. uncontended cycle, one Redis", &uncontended),
        ("4. uncontended cycle, Redlock on 5 nodes", &redlock_series),
        ("3. hand-off gap, 8 clients on one key", &handoff_series),
    ]);
    write_report(&table, &summary, &plot)
}

async fn floor_connection(url: &str) -> Result<MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// `count` raw cycles: one EVALSHA to acquire, one to release.
async fn floor_cycles(
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
        acquires.0.push(started.elapsed());
        floor_release(&mut connection, &lock_key, &channel).await?;
        cycles.0.push(started.elapsed());
    }
    Ok(())
}

/// The floor's release of `lock_key`, which must find the floor's lock.
async fn floor_release(connection: &mut MultiplexedConnection, lock_key: &str, channel: &str) -> Result {
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

struct Handoff {
    gaps: Samples,
    /// How long the 1 ms of work really took, and the release calls.
    holds: Samples,
    releases: Samples,
    cycles: usize,
    gave_up: usize,
    per_client: Vec<usize>,
}

/// One client of the hand-off scenario: its own connections, as if it were
/// a process of its own.
enum Waiter {
    Dlock(Locker),
    Rslock(rslock::LockManager),
    Redsync(Arc<redsync::Redsync<redsync::RedisInstance>>),
    DistributedLock(distributed_lock_redis::RedisLockProvider),
}

/// A lock a [`Waiter`] holds.
enum Held {
    Dlock(dlock_redis::LockGuard),
    Rslock(rslock::Lock),
    Redsync(redsync::Lock),
    DistributedLock(distributed_lock_redis::RedisLockHandle),
}

impl Waiter {
    async fn connect(kind: &str, url: &str) -> Result<Waiter> {
        Ok(match kind {
            "dlock" => Waiter::Dlock(Locker::new(RedisBackend::connect(url).await?)),
            "rslock" => Waiter::Rslock(rslock::LockManager::new(vec![url.to_owned()])),
            "redsync" => Waiter::Redsync(Arc::new(redsync::Redsync::new(vec![
                redsync::RedisInstance::new(url)?,
            ]))),
            "distributed-lock" => Waiter::DistributedLock(
                distributed_lock_redis::RedisLockProvider::builder()
                    .url(url)
                    .build()
                    .await?,
            ),
            other => return Err(format!("no hand-off client for {other}").into()),
        })
    }

    /// Waits for the lock as the library's waiting call does at its
    /// defaults (dlock and distributed-lock: up to 5 s; rslock and redsync
    /// retry a fixed number of times). `None`: it gave up.
    async fn acquire(&self, key: &str) -> Result<Option<Held>> {
        use distributed_lock_core::prelude::*;
        match self {
            Waiter::Dlock(locker) => match locker.lock(key).wait(Duration::from_secs(5)).await {
                Ok(guard) => Ok(Some(Held::Dlock(guard))),
                Err(dlock_redis::LockError::Timeout { .. }) => Ok(None),
                Err(error) => Err(error.into()),
            },
            Waiter::Rslock(manager) => match manager.lock(key, PEER_TTL).await {
                Ok(lock) => Ok(Some(Held::Rslock(lock))),
                Err(rslock::LockError::Unavailable) => Ok(None),
                Err(error) => Err(error.into()),
            },
            Waiter::Redsync(redsync) => {
                let (redsync, key) = (Arc::clone(redsync), key.to_owned());
                tokio::task::spawn_blocking(move || match redsync.lock(&key, PEER_TTL) {
                    Ok(lock) => Ok(Some(Held::Redsync(lock))),
                    Err(redsync::RedsyncError::LockRetriesExceeded(_)) => Ok(None),
                    Err(error) => Err(error.into()),
                })
                .await?
            }
            Waiter::DistributedLock(provider) => {
                match provider
                    .create_lock(key)
                    .acquire(Some(Duration::from_secs(5)))
                    .await
                {
                    Ok(handle) => Ok(Some(Held::DistributedLock(handle))),
                    Err(distributed_lock_core::error::LockError::Timeout(_)) => Ok(None),
                    Err(error) => Err(error.into()),
                }
            }
        }
    }

    async fn release(&self, held: Held) -> Result {
        use distributed_lock_core::prelude::*;
        match (self, held) {
            (_, Held::Dlock(guard)) => guard.release().await?,
            (Waiter::Rslock(manager), Held::Rslock(lock)) => manager.unlock(&lock).await,
            (Waiter::Redsync(redsync), Held::Redsync(lock)) => {
                let redsync = Arc::clone(redsync);
                tokio::task::spawn_blocking(move || redsync.unlock(&lock)).await??;
            }
            (_, Held::DistributedLock(handle)) => handle.release().await?,
            _ => return Err("a lock released through another library".into()),
        }
        Ok(())
    }
}

/// `clients` clients of library `kind` (each with its own connections) loop
/// on one key for `duration`: acquire, hold for `hold`, release, ask again
/// at once. A hand-off is the time from one holder's release returning to
/// the next holder's acquire returning (zero when the next holder was told
/// first).
async fn handoff(
    kind: &str,
    url: &str,
    clients: usize,
    hold: Duration,
    duration: Duration,
) -> Result<Handoff> {
    // Acquisitions of the one key are numbered in the order they return;
    // the hand-off after acquisition n is the gap to acquisition n + 1.
    let acquired_at = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let released_at = Arc::new(Mutex::new(HashMap::<usize, Instant>::new()));
    let durations = Arc::new(Mutex::new((Samples::default(), Samples::default())));
    let key = format!("handoff-{kind}-{}", std::process::id());
    let stop_at = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let waiter = Waiter::connect(kind, url).await?;
        let (acquired_at, released_at) = (Arc::clone(&acquired_at), Arc::clone(&released_at));
        let durations = Arc::clone(&durations);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut acquired = 0usize;
            let mut gave_up = 0usize;
            while Instant::now() < stop_at {
                let Some(held) = waiter.acquire(&key).await? else {
                    gave_up += 1;
                    continue;
                };
                let sequence = {
                    let mut acquired_at = acquired_at.lock().unwrap_or_else(PoisonError::into_inner);
                    acquired_at.push(Instant::now());
                    acquired_at.len() - 1
                };
                acquired += 1;
                let holding = Instant::now();
                let _ = tokio::task::spawn_blocking(move || work_for(holding, hold)).await;
                let releasing = Instant::now();
                waiter.release(held).await?;
                let released = Instant::now();
                released_at
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(sequence, released);
                let mut durations = durations.lock().unwrap_or_else(PoisonError::into_inner);
                durations.0.0.push(releasing - holding);
                durations.1.0.push(released - releasing);
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((acquired, gave_up))
        }));
    }
    let mut per_client = Vec::new();
    let mut gave_up = 0;
    for task in tasks {
        let (acquired, missed) = task.await.map_err(|error| format!("client task: {error}"))??;
        per_client.push(acquired);
        gave_up += missed;
    }
    let acquired_at = acquired_at.lock().unwrap_or_else(PoisonError::into_inner);
    let released_at = released_at.lock().unwrap_or_else(PoisonError::into_inner);
    let gaps = Samples(
        released_at
            .iter()
            .filter_map(|(sequence, released)| {
                let next = acquired_at.get(sequence + 1)?;
                Some(next.saturating_duration_since(*released))
            })
            .collect(),
    );
    let (holds, releases) = std::mem::take(&mut *durations.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(Handoff {
        gaps,
        holds,
        releases,
        cycles: per_client.iter().sum(),
        gave_up,
        per_client,
    })
}

/// Stands for `hold` of work that began at `began`, on a blocking-pool
/// thread. Tokio's timer rounds a 1 ms sleep up to the next millisecond
/// tick (up to 2 ms) and a thread sleep overshoots by the kernel's timer
/// slack and the wake-up, so the thread sleeps for all but the last 200 us
/// and spins through those.
fn work_for(began: Instant, hold: Duration) {
    const SPIN: Duration = Duration::from_micros(200);
    let until = began + hold;
    if let Some(coarse) = until
        .checked_duration_since(Instant::now())
        .and_then(|left| left.checked_sub(SPIN))
    {
        std::thread::sleep(coarse);
    }
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// One throughput slice: cycles per second, and CPU time per cycle in this
/// process and in the Redis server.
#[derive(Clone, Copy)]
struct Load {
    rate: f64,
    client_micros: f64,
    server_micros: f64,
}

impl Load {
    /// The median of each figure on its own.
    fn median(loads: &[Load]) -> Load {
        let median = |pick: fn(&Load) -> f64| {
            let mut values: Vec<f64> = loads.iter().map(pick).collect();
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied().unwrap_or(0.0)
        };
        Load {
            rate: median(|load| load.rate),
            client_micros: median(|load| load.client_micros),
            server_micros: median(|load| load.server_micros),
        }
    }
}

/// Each contender's median [`Load`] over `slices` slices of `slice`, taken in
/// turn so that drift in the machine's load hits all alike.
async fn interleaved_loads<'a>(
    contenders: &[(&'a str, Contender)],
    slices: usize,
    slice: Duration,
    admin: &mut MultiplexedConnection,
) -> Result<Vec<(&'a str, Load)>> {
    let mut loads: Vec<Vec<Load>> = contenders.iter().map(|_| Vec::new()).collect();
    for _ in 0..slices {
        for ((_, contender), loads) in contenders.iter().zip(&mut loads) {
            loads.push(measured_throughput(contender, slice, admin).await?);
        }
    }
    Ok(contenders
        .iter()
        .zip(&loads)
        .map(|((name, _), loads)| (*name, Load::median(loads)))
        .collect())
}

/// 64 tasks on 64 keys through one shared `contender` for `slice`.
async fn measured_throughput(
    contender: &Contender,
    slice: Duration,
    admin: &mut MultiplexedConnection,
) -> Result<Load> {
    let client_before = cpu_seconds();
    let server_before = server_cpu(admin).await?;
    let rate = throughput(|| contender.clone(), 64, slice).await?;
    let cycles = (rate * slice.as_secs_f64()).max(1.0);
    Ok(Load {
        rate,
        client_micros: (cpu_seconds() - client_before) / cycles * 1e6,
        server_micros: (server_cpu(admin).await? - server_before) / cycles * 1e6,
    })
}

/// Cycles per second of `tasks` tasks, each on its own key, for `duration`;
/// every task uses one shared contender (one connection, one backend).
async fn throughput(make: impl Fn() -> Contender, tasks: usize, duration: Duration) -> Result<f64> {
    let stop_at = Instant::now() + duration;
    let mut running = Vec::new();
    for task in 0..tasks {
        let mut contender = make();
        running.push(tokio::spawn(async move {
            let key = format!("throughput/{task}");
            let mut cycles = 0u64;
            while Instant::now() < stop_at {
                contender.cycle(&key).await.map_err(|error| error.to_string())?;
                cycles += 1;
            }
            Ok::<_, String>(cycles)
        }));
    }
    let mut total = 0u64;
    for task in running {
        total += task.await.map_err(|error| error.to_string())??;
    }
    Ok(total as f64 / duration.as_secs_f64())
}

/// What the watchdog-at-scale run saw.
struct Watchdogs {
    guards: usize,
    lost: usize,
    held_for: Duration,
    bytes_per_guard: f64,
    client_cpu: f64,
    commands_per_second: f64,
}

/// Holds `guards` auto-renewed locks (TTL 3 s, renewed every second) on one
/// backend for `hold`, then counts the guards that were lost, the client's
/// memory per guard (resident set growth), its CPU share, and the server's
/// commands per second.
async fn watchdog_at_scale(url: &str, guards: usize, hold: Duration) -> Result<Watchdogs> {
    let backend = RedisBackend::connect(url).await?;
    let locker = Locker::new(backend);
    let mut admin = floor_connection(url).await?;
    let resident_before = resident_bytes();
    let mut held = Vec::with_capacity(guards);
    let run = std::process::id();
    for index in 0..guards {
        held.push(
            locker
                .lock(format!("scale/{run}/{index}"))
                .ttl(Duration::from_secs(3))
                .try_lock()
                .await?,
        );
    }
    let resident_after = resident_bytes();
    let commands_before = server_commands(&mut admin).await?;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    tokio::time::sleep(hold).await;
    let held_for = started.elapsed();
    let cpu = cpu_seconds() - cpu_before;
    let commands = server_commands(&mut admin).await? - commands_before;
    let lost = held.iter().filter(|guard| !guard.is_held()).count();
    for guard in held {
        guard.release().await?;
    }
    Ok(Watchdogs {
        guards,
        lost,
        held_for,
        bytes_per_guard: resident_after.saturating_sub(resident_before) as f64 / guards as f64,
        client_cpu: cpu / held_for.as_secs_f64(),
        commands_per_second: commands as f64 / held_for.as_secs_f64(),
    })
}

/// This process's resident memory in bytes (Linux), 0 if unknown.
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// CPU seconds this process has used (user + system), 0 if unknown.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the
    // 12th, stime the 13th, in clock ticks (100 per second on Linux).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|field| field.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The server's CPU seconds (user + system).
async fn server_cpu(admin: &mut MultiplexedConnection) -> Result<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(admin).await?;
    let field = |name: &str| {
        info.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(field("used_cpu_user:") + field("used_cpu_sys:"))
}

/// The server's count of processed commands.
async fn server_commands(admin: &mut MultiplexedConnection) -> Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(admin).await?;
    info.lines()
        .find_map(|line| line.strip_prefix("total_commands_processed:"))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| "INFO stats has no total_commands_processed".into())
}

fn write_report(table: &str, summary: &str, plot: &str) -> Result {
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("model name")
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let server = std::env::var("DLOCK_BENCH_REDIS_VERSION").unwrap_or_else(|_| "unknown".into());
    let date = std::env::var("DLOCK_BENCH_DATE").unwrap_or_else(|_| "unknown".into());
    let text = format!(
        "# Benchmarks\n\n\
         Written by `cargo xtask bench` on {date}. Machine: {cores} cores, {cpu}. \
         Redis server {server}, on loopback. dlock {}.\n\n\
         Every contender runs against the same server in the same run, interleaved; ratios are to \
         the floor measured in that run (the same round trips with the raw client, `redis` or `etcd-client`, and no library; Redlock is compared with dlock on one node).\n\n\
         {table}\n```text\n{summary}```\n\n\
         The peers run at their defaults and do less per acquisition: rslock, redsync and \
         distributed-lock take the lock with a plain `SET NX PX` and release it with a scripted \
         delete, with no fencing counter and no release notification; redsync is a blocking \
         client that opens a new connection per command.\n\n\
         How the scenarios behave (the figures above show by how much):\n\n\
         - Throughput (2) is shared between the client and the one Redis thread on two cores; \
         the CPU time per cycle shows where it goes. dlock's acquire is a script (`SET NX PX` and \
         the fencing counter's `INCR` in one atomic step), which costs the server more than the \
         peers' plain `SET NX PX`. The \"unfenced floor\" row is the raw client doing the peers' \
         round trips (`SET NX PX`, then the floor's release script): the gap between it and the \
         floor is what an atomic fencing counter costs on this machine, whatever library sends it.\n\
         - A hand-off (3) on Redis: dlock's waiters stand in a line on the server, and the \
         holder's release hands the lock to the first of them in the same script and tells only \
         that waiter's client, which takes the lock from the message (no round trip with \
         auto-renewal), so the hand-off is about one message and waiters are served in turn. \
         rslock and redsync retry on a timer instead: a client that releases often takes the lock again at once (short hand-offs, \
         uneven acquisitions per client, attempts that give up). distributed-lock's `acquire` makes \
         one attempt and returns `Timeout` while the lock is held, so the harness calls it again at \
         once: its \"gave up\" count is that busy loop.\n\
         - Redlock (4) on five server processes that share two cores: the raw five-node floor \
         shows what the fan-out itself costs on this machine.\n\n\
         Latency distributions (share of samples at or below each latency, log scale):\n\n\
         ![latency distributions](benchmarks-latency.svg)\n",
        env!("CARGO_PKG_VERSION"),
    );
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    std::fs::write(docs.join("benchmarks.md"), text)?;
    std::fs::write(docs.join("benchmarks-latency.svg"), plot)?;
    println!("wrote docs/benchmarks.md");
    Ok(())
}
