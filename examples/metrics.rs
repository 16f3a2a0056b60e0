//! dlock's metrics, served as Prometheus exposition text: a few workers
//! contend for one lock, one of them holds it past its lease and loses it,
//! and the example prints what `metrics-exporter-prometheus` would serve on
//! its `/metrics` endpoint.
//!
//! ```text
//! cargo run --example metrics                                  # in memory
//! DLOCK_URL=redis://127.0.0.1:6379 cargo run --example metrics --features redis
//! DLOCK_URL=etcd://127.0.0.1:2379 cargo run --example metrics --features etcd
//! ```
//!
//! dlock records through the `metrics` facade (dlock-core's `metrics`
//! feature); the application installs the exporter it uses, here the
//! Prometheus one.

#![allow(clippy::print_stdout)]

use std::time::Duration;

use dlock_core::{LockBackend, LockError, Locker};
use dlock_testkit::MemoryBackend;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

const KEY: &str = "jobs/compaction";
const WORKERS: usize = 4;
const ROUNDS: usize = 5;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let prometheus = PrometheusBuilder::new()
        // Durations as histograms with buckets (the exporter's default is a summary).
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".to_owned()),
            &[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0],
        )?
        .install_recorder()?;
    dlock_core::describe_metrics();

    let backend = backend().await?;
    println!(
        "backend: {}; {WORKERS} workers x {ROUNDS} rounds on `{KEY}`\n",
        backend.name()
    );
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        // One locker per worker, as one per process; the key is a label
        // here because this program uses one key only.
        let locker = Locker::from_arc(std::sync::Arc::clone(&backend)).metrics_key_label(true);
        workers.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = locker.lock(KEY).wait(Duration::from_secs(10)).await?;
                tokio::time::sleep(Duration::from_millis(10 + 5 * worker as u64)).await; // the work
                guard.release().await?;
            }
            Ok::<(), LockError>(())
        }));
    }
    for worker in workers {
        worker.await??;
    }

    // A holder without auto-renewal outlives its lease and loses the lock.
    let locker = Locker::from_arc(backend).metrics_key_label(true);
    let expiring = locker
        .lock(KEY)
        .ttl(Duration::from_secs(1))
        .auto_renew(false)
        .await?;
    expiring.lost().await;
    drop(expiring);
    locker.wait_for_cleanup().await;

    println!("{}", prometheus.render());
    Ok(())
}

/// The in-memory backend, or the one `DLOCK_URL` names (`redis://` with
/// the `redis` feature, `etcd://[user:password@]host:port,...` with the
/// `etcd` feature).
async fn backend() -> Result<std::sync::Arc<dyn LockBackend>, Box<dyn std::error::Error>> {
    let Ok(url) = std::env::var("DLOCK_URL") else {
        return Ok(std::sync::Arc::new(MemoryBackend::new()));
    };
    #[cfg(feature = "redis")]
    if url.starts_with("redis") {
        return Ok(std::sync::Arc::new(
            dlock_redis::RedisBackend::connect(&url).await?,
        ));
    }
    #[cfg(feature = "etcd")]
    if url.starts_with("etcd") {
        // `connect` reads an `etcd://` URL's members, user and password.
        return Ok(std::sync::Arc::new(
            dlock_etcd::EtcdBackend::connect([url.as_str()]).await?,
        ));
    }
    Err(format!(
        "DLOCK_URL={url}: this build has no backend for it; add `--features redis` (redis://) or `--features etcd` (etcd://)"
    )
    .into())
}
