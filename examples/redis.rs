//! A job that must run on one machine at a time, guarded by a Redis lock:
//! it takes the lock, does its work while watching for the loss of the
//! lock, passes the fencing token along with its writes, and releases.
//! A second client waits on the same key and is woken by the release.
//!
//! ```text
//! cargo run -p dlock-examples --features redis --example redis -- redis://127.0.0.1:6379
//! cargo run -p dlock-examples --features redis --example redis -- cluster redis://127.0.0.1:7000 redis://127.0.0.1:7001
//! cargo run -p dlock-examples --features redis --example redis -- sentinel mymaster redis://127.0.0.1:26379 redis://127.0.0.1:26380
//! ```
//!
//! `cargo xtask servers` starts all three deployments and prints their addresses.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::{Duration, Instant};

use dlock_redis::{LockError, LockGuard, Locker, RedisBackend};
use tokio::time::sleep;

const KEY: &str = "jobs/nightly-report";

async fn connect(args: &[String]) -> Result<RedisBackend, LockError> {
    match args {
        [kind, seeds @ ..] if kind == "cluster" && !seeds.is_empty() => {
            RedisBackend::connect_cluster(seeds).await
        }
        [kind, master, sentinels @ ..] if kind == "sentinel" && !sentinels.is_empty() => {
            RedisBackend::connect_sentinel(sentinels, master).await
        }
        [url] => RedisBackend::connect(url).await,
        [] => RedisBackend::connect("redis://127.0.0.1:6379").await,
        _ => Err(LockError::invalid_options(
            None,
            "usage: redis [URL | cluster URL... | sentinel MASTER URL...]",
        )),
    }
}

/// The job's work: a few steps, each stamped with the fencing token. A
/// storage layer that remembers the highest token it has seen would refuse
/// a write from a holder whose lock has since passed to someone else.
async fn run_job(guard: &LockGuard) {
    for step in 1..=3 {
        println!(
            "  step {step}, written with fencing token {}",
            guard.fencing_token()
        );
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), LockError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend = connect(&args).await?;
    println!("connected: {backend:?}");

    let locker = Locker::new(backend.clone());
    let guard = locker
        .lock(KEY)
        .ttl(Duration::from_secs(10)) // renewed every ~3.3 s while held
        .wait(Duration::from_secs(30))
        .await?;
    println!("holder: acquired `{KEY}`, token {}", guard.fencing_token());

    // Another process (here: another backend, with its own connections)
    // wants the same job; it waits for a release notification.
    let other = Locker::new(connect(&args).await?);
    let waiting = tokio::spawn(async move {
        let guard = other.lock(KEY).wait(Duration::from_secs(30)).await?;
        Ok::<_, LockError>((Instant::now(), guard))
    });

    tokio::select! {
        () = run_job(&guard) => println!("holder: job done"),
        () = guard.lost() => {
            eprintln!("holder: lost the lock mid-job; stopping without further writes");
            return Ok(());
        }
    }
    let released_at = Instant::now();
    guard.release().await?;

    let (acquired_at, next) = waiting
        .await
        .map_err(|error| LockError::unavailable(Some(KEY), format!("the waiting task failed: {error}")))??;
    println!(
        "waiter: acquired `{KEY}`, token {}, {:?} after the release",
        next.fencing_token(),
        acquired_at.saturating_duration_since(released_at)
    );
    next.release().await?;
    Ok(())
}
