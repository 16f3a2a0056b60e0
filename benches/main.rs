//! `cargo xtask bench`: dlock against the floor (the same round trips with
//! the raw redis client) on the same server, in one run, interleaved, as
//! ratios. Reads the server from `DLOCK_BENCH_REDIS_URL` (xtask starts it).
//!
//! Scenarios so far: the uncontended cycle (acquire + release, one task, one
//! key) and the contended hand-off (8 clients, one key, 1 ms of work each).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dlock_redis::{LockError, Locker, RedisBackend};
use redis::Script;
use redis::aio::MultiplexedConnection;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The floor's acquire: what dlock's script must do at least (set with
/// expiry if absent, bump the fencing counter), nothing more.
const FLOOR_ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return redis.call('PTTL', KEYS[1])
";

/// The floor's release: owner-checked delete and a release notification.
const FLOOR_RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '')
  return 1
end
return 0
";

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

#[tokio::main]
async fn main() -> Result {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let settings = Settings {
        quick,
        cycles: if quick { 2_000 } else { 20_000 },
        rounds: 10,
        handoff_for: Duration::from_secs(if quick { 2 } else { 10 }),
    };
    let url = std::env::var("DLOCK_BENCH_REDIS_URL")
        .map_err(|_| "DLOCK_BENCH_REDIS_URL is not set; run `cargo xtask bench`")?;

    let floor = floor_connection(&url).await?;
    let locker = Locker::new(RedisBackend::connect(&url).await?);
    // Warm up both (script load, connections).
    floor_cycles(
        &floor,
        "warmup",
        200,
        &mut Samples::default(),
        &mut Samples::default(),
    )
    .await?;
    dlock_cycles(&locker, "warmup", 200, &mut Samples::default()).await?;

    let mut floor_cycle = Samples::default();
    let mut floor_acquire = Samples::default();
    let mut dlock_cycle = Samples::default();
    let per_round = settings.cycles / settings.rounds;
    for round in 0..settings.rounds {
        // Interleaved, and alternating who goes first, so that drift in the
        // machine's load hits both alike.
        if round % 2 == 0 {
            floor_cycles(
                &floor,
                "uncontended",
                per_round,
                &mut floor_cycle,
                &mut floor_acquire,
            )
            .await?;
            dlock_cycles(&locker, "uncontended", per_round, &mut dlock_cycle).await?;
        } else {
            dlock_cycles(&locker, "uncontended", per_round, &mut dlock_cycle).await?;
            floor_cycles(
                &floor,
                "uncontended",
                per_round,
                &mut floor_cycle,
                &mut floor_acquire,
            )
            .await?;
        }
    }
    let round_trip = floor_acquire.median();

    let handoff = handoff(&url, 8, Duration::from_millis(1), settings.handoff_for).await?;

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| scenario | contender | median | p99 | ratio to floor (median) |"
    );
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
    row(
        &mut table,
        "uncontended acquire + release",
        "floor (raw EVALSHA x2)",
        &floor_cycle,
        floor_cycle.median(),
    );
    row(
        &mut table,
        "uncontended acquire + release",
        "dlock RedisBackend",
        &dlock_cycle,
        floor_cycle.median(),
    );
    row(
        &mut table,
        "hand-off: release returns -> next holder's acquire returns",
        "dlock RedisBackend, 8 clients",
        &handoff.gaps,
        round_trip,
    );
    let counts: Vec<String> = handoff.per_client.iter().map(ToString::to_string).collect();
    let summary = format!(
        "floor round trip (one acquire EVALSHA): median {round_trip:?}\n\
         hand-off: {} hand-offs in {:?}, {:.0} cycles/s (bar: >= 0.9 / (1 ms hold + one round trip) = {:.0}/s), \
         gave up: {}, acquisitions per client: [{}]\n",
        handoff.gaps.0.len(),
        settings.handoff_for,
        handoff.cycles as f64 / settings.handoff_for.as_secs_f64(),
        0.9 / (0.001 + round_trip.as_secs_f64()),
        handoff.gave_up,
        counts.join(", "),
    );
    println!("{table}\n{summary}");
    if !settings.quick {
        write_report(&table, &summary)?;
    }
    Ok(())
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
    let acquire = Script::new(FLOOR_ACQUIRE);
    let release = Script::new(FLOOR_RELEASE);
    let mut connection = connection.clone();
    let lock_key = format!("floor:{{{key}}}");
    let fence_key = format!("floor:{{{key}}}:fence");
    let channel = format!("floor:{{{key}}}:released");
    for _ in 0..count {
        let started = Instant::now();
        let _token: i64 = acquire
            .key(&lock_key)
            .key(&fence_key)
            .arg("0123456789abcdef0123456789abcdef")
            .arg(30_000)
            .invoke_async(&mut connection)
            .await?;
        acquires.0.push(started.elapsed());
        let released: i64 = release
            .key(&lock_key)
            .arg("0123456789abcdef0123456789abcdef")
            .arg(&channel)
            .invoke_async(&mut connection)
            .await?;
        if released != 1 {
            return Err("the floor's release found no lock".into());
        }
        cycles.0.push(started.elapsed());
    }
    Ok(())
}

/// `count` dlock cycles: `try_lock` + `release`, with the default settings.
async fn dlock_cycles(locker: &Locker, key: &str, count: usize, cycles: &mut Samples) -> Result {
    for _ in 0..count {
        let started = Instant::now();
        let guard = locker.try_lock(key).await?;
        guard.release().await?;
        cycles.0.push(started.elapsed());
    }
    Ok(())
}

struct Handoff {
    gaps: Samples,
    cycles: usize,
    gave_up: usize,
    per_client: Vec<usize>,
}

/// `clients` clients (own backends) loop on one key for `duration`: acquire,
/// hold for `hold`, release, ask again at once. A hand-off is the time from
/// one holder's `release()` returning to the next holder's `lock()`
/// returning (zero when the waiter was told first).
async fn handoff(url: &str, clients: usize, hold: Duration, duration: Duration) -> Result<Handoff> {
    // Fencing tokens on one key rise by one per grant, so the hand-off
    // from token t is the gap between its release and the grant of t + 1.
    let acquired_at = Arc::new(Mutex::new(HashMap::<u64, Instant>::new()));
    let released_at = Arc::new(Mutex::new(HashMap::<u64, Instant>::new()));
    let key = format!("handoff-{}", std::process::id());
    let stop_at = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let locker = Locker::new(RedisBackend::connect(url).await?);
        let (acquired_at, released_at) = (Arc::clone(&acquired_at), Arc::clone(&released_at));
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut acquired = 0usize;
            let mut gave_up = 0usize;
            while Instant::now() < stop_at {
                match locker.lock(&key).wait(Duration::from_secs(5)).await {
                    Ok(guard) => {
                        let token = guard.fencing_token().get();
                        record(&acquired_at, token);
                        acquired += 1;
                        tokio::time::sleep(hold).await;
                        guard.release().await?;
                        record(&released_at, token);
                    }
                    Err(LockError::Timeout { .. }) => gave_up += 1,
                    Err(error) => return Err(error),
                }
            }
            Ok((acquired, gave_up))
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
            .filter_map(|(token, released)| {
                let next = acquired_at.get(&(token + 1))?;
                Some(next.saturating_duration_since(*released))
            })
            .collect(),
    );
    let cycles = per_client.iter().sum();
    Ok(Handoff {
        gaps,
        cycles,
        gave_up,
        per_client,
    })
}

fn record(times: &Mutex<HashMap<u64, Instant>>, token: u64) {
    times
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(token, Instant::now());
}

fn write_report(table: &str, summary: &str) -> Result {
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
         the floor measured in that run (the same round trips with the raw `redis` client and no library).\n\n\
         {table}\n```text\n{summary}```\n\n\
         Not yet measured here: the peer crates (rslock, redsync, distributed-lock), Redlock, etcd, \
         throughput over 64 keys, and the watchdog at scale (see the open benchmark issue).\n",
        env!("CARGO_PKG_VERSION"),
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    std::fs::write(&path, text)?;
    println!("wrote docs/benchmarks.md");
    Ok(())
}
