//! Several workers share one lock; one of them stalls, loses its lock, and
//! learns about it, while fencing turns away its late write.
//!
//! Runs on the in-memory backend, with nothing to install:
//!
//! ```text
//! cargo run --example quickstart
//! ```

#![allow(clippy::print_stdout)]

use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_testkit::{FencedResource, MemoryBackend};
use tokio::time::sleep;

const KEY: &str = "reports/daily";

#[tokio::main]
async fn main() -> Result<(), LockError> {
    // One backend, shared by all workers like one Redis shared by many hosts.
    let backend = MemoryBackend::new();
    // The resource the lock protects; it refuses writes with stale tokens.
    let report = FencedResource::new();

    println!("== four workers take turns on `{KEY}` ==");
    let mut workers = Vec::new();
    for worker in 1..=4 {
        let locker = Locker::new(backend.clone());
        let report = report.clone();
        workers.push(tokio::spawn(async move {
            let guard = locker
                .lock(KEY)
                .ttl(Duration::from_secs(2))
                .wait(Duration::from_secs(10))
                .await?;
            let token = guard.fencing_token();
            println!("worker {worker}: acquired, fencing token {token}");
            sleep(Duration::from_millis(100)).await; // the work
            let accepted = report.write(worker, token).is_ok();
            println!("worker {worker}: wrote the report with token {token} (accepted: {accepted})");
            guard.release().await?;
            Ok::<(), LockError>(())
        }));
    }
    for worker in workers {
        worker.await.expect("worker task panicked")?;
    }

    println!("\n== worker 5 stalls past its lease ==");
    let stalled = Locker::new(backend.clone());
    let guard = stalled.lock(KEY).ttl(Duration::from_secs(1)).await?;
    let stale_token = guard.fencing_token();
    println!("worker 5: acquired, fencing token {stale_token}");
    // Simulate a long GC pause or a frozen VM: the lease ends on the server.
    backend.force_expire(KEY);

    // Meanwhile worker 6 gets the lock and writes.
    let other = Locker::new(backend.clone());
    let fresh = other.lock(KEY).wait(Duration::from_secs(5)).await?;
    println!("worker 6: acquired, fencing token {}", fresh.fencing_token());
    report
        .write(6, fresh.fencing_token())
        .expect("the newest token is accepted");
    println!("worker 6: wrote the report with token {}", fresh.fencing_token());

    // Worker 5's watchdog finds out at its next renewal (within ttl/3).
    guard.lost().await;
    println!("worker 5: lost its lock (is_held = {})", guard.is_held());
    match report.write(5, stale_token) {
        Ok(()) => println!("worker 5: late write accepted (this must not happen)"),
        Err(stale) => println!("worker 5: late write rejected by the fence: {stale}"),
    }
    match guard.release().await {
        Err(error) => println!("worker 5: release refused: {error}"),
        Ok(()) => println!("worker 5: released (unexpected)"),
    }
    fresh.release().await?;

    let verdict = report.check();
    println!(
        "\nhistory: {} writes accepted, {} stale writes rejected, {} overlaps",
        verdict.accepted, verdict.rejected_stale, verdict.overlaps
    );
    Ok(())
}
