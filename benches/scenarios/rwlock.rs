//! Scenario 6, the read-write lock on one Redis: the uncontended read
//! cycle against the raw floor, and 16 clients mixing 90 % reads and 10 %
//! writes with 1 ms holds (reads per second against the ideal, the same
//! load on an in-process read-write lock; the writers' wait);
//! distributed-lock's reader-writer lock side by side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dlock_redis::{Locker, RedisBackend};
use tokio::task::JoinSet;

use crate::contenders::{Contender, floor_connection, interleaved};
use crate::report::{Report, ratio};
use crate::stats::Samples;
use crate::{Budget, Result, Servers};

const UNCONTENDED: &str = "6. uncontended read acquire + release, one Redis";
const CLIENTS: usize = 16;
const READ_PERCENT: u8 = 90;
const HOLD: Duration = Duration::from_millis(1);
/// How long one lock may wait in the mixed load.
const WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn run(servers: &Servers, budget: Budget, report: &mut Report) -> Result {
    let url = servers.redis()?;
    let peer = Arc::new(provider(url).await?);
    const FLOOR: usize = 0;
    const READ: usize = 1;
    const WRITE: usize = 2;
    const PEER: usize = 3;
    let mut contenders = vec![
        Contender::FloorRedis(floor_connection(url).await?),
        Contender::DlockRead(Locker::new(RedisBackend::connect(url).await?)),
        Contender::Dlock(Locker::new(RedisBackend::connect(url).await?)),
        Contender::DistributedLockRead(Arc::clone(&peer)),
    ];
    let cycles = interleaved(&mut contenders, "rw-uncontended", budget.cycles(), Budget::ROUNDS).await?;
    let floor = cycles[FLOOR].median();
    report.row(UNCONTENDED, "floor (raw EVALSHA x2)", &cycles[FLOOR], floor);
    report.row(UNCONTENDED, "dlock read_lock", &cycles[READ], floor);
    report.row(UNCONTENDED, "dlock lock (the writer)", &cycles[WRITE], floor);
    report.row(UNCONTENDED, "distributed-lock read lock", &cycles[PEER], floor);
    report.panel(
        "6. uncontended read cycle, one Redis",
        vec![
            ("floor", &cycles[FLOOR]),
            ("dlock read", &cycles[READ]),
            ("distributed-lock read", &cycles[PEER]),
        ],
    );

    // The mixed load, dlock and the peer in turns so that drift in the
    // machine's load hits both alike.
    let (turns, turn) = if budget.quick {
        (2, Duration::from_secs(1))
    } else {
        (4, Duration::from_secs(5))
    };
    let (mut ideal, mut dlock, mut distributed) = (Mixed::default(), Mixed::default(), Mixed::default());
    for round in 0..turns {
        let key = format!("rw-mixed-{round}");
        ideal.add(mixed_load(&Side::InProcess, &key, turn).await?);
        dlock.add(mixed_load(&Side::Dlock(url.to_owned()), &key, turn).await?);
        distributed.add(mixed_load(&Side::DistributedLock(url.to_owned()), &key, turn).await?);
    }
    let elapsed = turn * turns;
    let ideal_rate = ideal.reads as f64 / elapsed.as_secs_f64();
    report.line(format!(
        "read-write lock, {CLIENTS} clients, {READ_PERCENT} % reads holding {HOLD:?}, {elapsed:?} each in {turns} turns; \
         the ideal is the same load on an in-process fair read-write lock (tokio's RwLock: no network, the same \
         writer-first turns): {ideal_rate:.0} reads/s, writer wait median {:?}, p99 {:?}",
        ideal.writer_waits.median(),
        ideal.writer_waits.p99(),
    ));
    for (name, load) in [("dlock", &dlock), ("distributed-lock", &distributed)] {
        let reads_per_second = load.reads as f64 / elapsed.as_secs_f64();
        report.line(format!(
            "  {name}: {reads_per_second:.0} reads/s ({:.2} of the ideal), {} writes; writer wait median {:?}, p99 {:?}; \
             {} busy answers asked again at once, {} gave up or failed",
            reads_per_second / ideal_rate.max(1.0),
            load.writes,
            load.writer_waits.median(),
            load.writer_waits.p99(),
            load.retries,
            load.errors,
        ));
    }
    report.line(format!(
        "  dlock/distributed-lock: {:.2}x the reads per second; uncontended read cycle {:.2}x the floor (distributed-lock {:.2}x)",
        dlock.reads as f64 / (distributed.reads as f64).max(1.0),
        ratio(cycles[READ].median(), floor),
        ratio(cycles[PEER].median(), floor),
    ));
    report.panel(
        "6. writer wait, 16 clients, 90 % reads",
        vec![
            ("dlock", &dlock.writer_waits),
            ("distributed-lock", &distributed.writer_waits),
        ],
    );
    Ok(())
}

async fn provider(url: &str) -> Result<distributed_lock_redis::RedisLockProvider> {
    Ok(distributed_lock_redis::RedisLockProvider::builder()
        .url(url)
        .build()
        .await?)
}

/// Whose read-write lock the mixed load takes, on the server at the URL.
enum Side {
    /// The ideal: one in-process read-write lock, no network.
    InProcess,
    Dlock(String),
    DistributedLock(String),
}

/// Calls `acquire` again until it gives a handle or `WAIT` has passed
/// since `asked`; counts the calls that came back without one.
async fn retried<H, E, F>(done: &mut Mixed, asked: Instant, mut acquire: impl FnMut() -> F) -> Option<H>
where
    F: std::future::Future<Output = std::result::Result<H, E>>,
{
    loop {
        match acquire().await {
            Ok(handle) => return Some(handle),
            Err(_) if asked.elapsed() < WAIT => done.retries += 1,
            Err(_) => return None,
        }
    }
}

/// Counts a lock that `handle` holds (asked for at `asked`), holds it for
/// `HOLD`, and releases it; whether all went well.
async fn hold_and_release<H: distributed_lock_core::LockHandle>(
    done: &mut Mixed,
    writing: bool,
    asked: Instant,
    handle: Option<H>,
) -> bool {
    let Some(handle) = handle else {
        return false;
    };
    done.count(writing, asked.elapsed());
    tokio::time::sleep(HOLD).await;
    handle.release().await.is_ok()
}

/// What a mixed load got done.
#[derive(Default)]
struct Mixed {
    reads: usize,
    writes: usize,
    errors: usize,
    /// Attempts that came back busy and were made again at once.
    retries: usize,
    writer_waits: Samples,
}

impl Mixed {
    fn add(&mut self, other: Mixed) {
        self.reads += other.reads;
        self.writes += other.writes;
        self.errors += other.errors;
        self.retries += other.retries;
        self.writer_waits.extend(other.writer_waits);
    }
}

/// `CLIENTS` clients, each with its own connection, take the lock on `key`
/// for `length`: a read `READ_PERCENT` % of the time, else a write, each
/// held for `HOLD`.
async fn mixed_load(side: &Side, key: &str, length: Duration) -> Result<Mixed> {
    let mut tasks = JoinSet::new();
    let in_process = Arc::new(tokio::sync::RwLock::new(()));
    let stop = Instant::now() + length;
    for client in 0..CLIENTS {
        let key = key.to_owned();
        let mut rng = fastrand::Rng::with_seed(client as u64);
        match side {
            Side::InProcess => {
                let lock = Arc::clone(&in_process);
                tasks.spawn(async move {
                    let mut done = Mixed::default();
                    while Instant::now() < stop {
                        let writing = rng.u8(..100) >= READ_PERCENT;
                        let asked = Instant::now();
                        if writing {
                            let _writer = lock.write().await;
                            done.count(writing, asked.elapsed());
                            tokio::time::sleep(HOLD).await;
                        } else {
                            let _reader = lock.read().await;
                            done.count(writing, asked.elapsed());
                            tokio::time::sleep(HOLD).await;
                        }
                    }
                    done
                });
            }
            Side::Dlock(url) => {
                let locker = Locker::new(RedisBackend::connect(url).await?);
                tasks.spawn(async move {
                    let mut done = Mixed::default();
                    while Instant::now() < stop {
                        let writing = rng.u8(..100) >= READ_PERCENT;
                        let asked = Instant::now();
                        let request = if writing {
                            locker.lock(&key)
                        } else {
                            locker.read_lock(&key)
                        };
                        let Ok(guard) = request.wait(WAIT).await else {
                            done.errors += 1;
                            continue;
                        };
                        done.count(writing, asked.elapsed());
                        tokio::time::sleep(HOLD).await;
                        if guard.release().await.is_err() {
                            done.errors += 1;
                        }
                    }
                    done
                });
            }
            Side::DistributedLock(url) => {
                use distributed_lock_core::prelude::*;
                let provider = provider(url).await?;
                tasks.spawn(async move {
                    let lock = provider.create_reader_writer_lock(&key);
                    let mut done = Mixed::default();
                    while Instant::now() < stop {
                        let writing = rng.u8(..100) >= READ_PERCENT;
                        let asked = Instant::now();
                        // Its acquire gives up (`Timeout`) while the lock is
                        // held, whatever the timeout: ask again at once, and
                        // count the wait from the first ask.
                        let released = if writing {
                            let handle = retried(&mut done, asked, || lock.acquire_write(Some(WAIT))).await;
                            hold_and_release(&mut done, writing, asked, handle).await
                        } else {
                            let handle = retried(&mut done, asked, || lock.acquire_read(Some(WAIT))).await;
                            hold_and_release(&mut done, writing, asked, handle).await
                        };
                        if !released {
                            done.errors += 1;
                        }
                    }
                    done
                });
            }
        }
    }
    let mut total = Mixed::default();
    while let Some(done) = tasks.join_next().await {
        total.add(done?);
    }
    Ok(total)
}

impl Mixed {
    fn count(&mut self, writing: bool, waited: Duration) {
        if writing {
            self.writes += 1;
            self.writer_waits.push(waited);
        } else {
            self.reads += 1;
        }
    }
}
