//! Scenario 3, the hand-off: 8 clients of each library, each with its own
//! connections, loop on one key (acquire, 1 ms of work, release). A
//! hand-off is the time from one holder's release returning to the next
//! holder's acquire returning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use dlock_redis::{Locker, RedisBackend};

use crate::contenders::PEER_TTL;
use crate::report::{Report, ratio};
use crate::stats::Samples;
use crate::{Budget, Result, Servers};

const SCENARIO: &str = "3. hand-off, 8 clients on one key, 1 ms hold: release returns -> next holder's acquire returns (ratio to one round trip)";
const CLIENTS: usize = 8;
const HOLD: Duration = Duration::from_millis(1);
const LIBRARIES: [&str; 4] = ["dlock", "rslock", "redsync", "distributed-lock"];

/// Runs the hand-off for every library; `round_trip` is the ratios' base.
pub(crate) async fn run(
    servers: &Servers,
    budget: Budget,
    round_trip: Duration,
    report: &mut Report,
) -> Result {
    let url = servers.redis()?;
    let duration = Duration::from_secs(if budget.quick { 2 } else { 10 });
    let mut runs = Vec::new();
    for kind in LIBRARIES {
        let run = handoff(kind, url, CLIENTS, HOLD, duration).await?;
        report.row(SCENARIO, kind, &run.gaps, round_trip);
        runs.push((kind, run));
    }
    let bar = 0.9 / (HOLD.as_secs_f64() + round_trip.as_secs_f64());
    report.line(format!(
        "hand-off, {CLIENTS} clients, {duration:?} each (bar for dlock: >= 0.9 / (1 ms hold + one round trip) = {bar:.0} cycles/s; \
         the hold is 1 ms on a blocking-pool thread, slept then spun):"
    ));
    for (kind, run) in &runs {
        let counts: Vec<String> = run.per_client.iter().map(ToString::to_string).collect();
        report.line(format!(
            "  {kind}: {:.0} cycles/s, median hand-off {:.2} round trips (p99 {:.2}), gave up {}, acquisitions per client [{}]; \
             medians: hold {:?}, release {:?}",
            run.cycles as f64 / duration.as_secs_f64(),
            ratio(run.gaps.median(), round_trip),
            ratio(run.gaps.p99(), round_trip),
            run.gave_up,
            counts.join(", "),
            run.holds.median(),
            run.releases.median(),
        ));
    }
    report.panel(
        "3. hand-off gap, 8 clients on one key",
        runs.iter().map(|(kind, run)| (*kind, &run.gaps)).collect(),
    );
    Ok(())
}

/// dlock's hand-off alone, for `duration`.
pub(crate) async fn profile(url: &str, duration: Duration) -> Result {
    let run = handoff("dlock", url, CLIENTS, HOLD, duration).await?;
    println!(
        "dlock hand-off: {} cycles in {duration:?}, median gap {:?}, p99 {:?}, hold {:?}, release {:?}, gave up {}, per client {:?}",
        run.cycles,
        run.gaps.median(),
        run.gaps.p99(),
        run.holds.median(),
        run.releases.median(),
        run.gave_up,
        run.per_client
    );
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
