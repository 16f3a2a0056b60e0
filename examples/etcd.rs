//! Fair locking on etcd: clients that queue for a held lock get it in the
//! order they asked, each with a higher fencing token (the create revision
//! of its waiter key).
//!
//! ```text
//! cargo run -p dlock-examples --features etcd --example etcd -- http://127.0.0.1:2379 http://127.0.0.1:22379 http://127.0.0.1:32379
//! ```
//!
//! `cargo xtask servers` starts a 3-member cluster and prints its endpoints.

#![allow(clippy::print_stdout)]

use std::time::Duration;

use dlock_etcd::{EtcdBackend, LockError, Locker};
use tokio::time::sleep;

const KEY: &str = "migrations/schema";

#[tokio::main]
async fn main() -> Result<(), LockError> {
    let mut endpoints: Vec<String> = std::env::args().skip(1).collect();
    if endpoints.is_empty() {
        endpoints.push("http://127.0.0.1:2379".into());
    }
    let first = Locker::new(EtcdBackend::connect(&endpoints).await?);
    let guard = first.lock(KEY).ttl(Duration::from_secs(10)).await?;
    println!("client 0: holds `{KEY}`, token {}", guard.fencing_token());

    // Three more clients queue up, one after the other.
    let mut waiters = Vec::new();
    for client in 1..=3 {
        let locker = Locker::new(EtcdBackend::connect(&endpoints).await?);
        waiters.push(tokio::spawn(async move {
            let guard = locker.lock(KEY).wait(Duration::from_secs(30)).await?;
            println!("client {client}: acquired, token {}", guard.fencing_token());
            sleep(Duration::from_millis(50)).await; // the migration step
            guard.release().await?;
            Ok::<_, LockError>(())
        }));
        // Let each waiter queue before the next one asks.
        sleep(Duration::from_millis(100)).await;
    }
    guard.release().await?;
    println!("client 0: released; the waiters follow in the order they queued");
    for waiter in waiters {
        waiter.await.map_err(|error| {
            LockError::unavailable(Some(KEY), format!("a waiting task failed: {error}"))
        })??;
    }
    Ok(())
}
