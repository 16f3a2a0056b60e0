//! dlock's metrics (dlock-core's `metrics` feature), counted by the
//! `metrics-util` debugging recorder after a scripted run on the memory
//! backend with a paused clock.
//!
//! One test in this binary: the recorder is process-global.

use std::collections::BTreeMap;
use std::time::Duration;

use dlock_core::{LockError, Locker};
use dlock_testkit::MemoryBackend;
use metrics_util::MetricKind;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// One metric's series: its name and labels, `name{label=value,…}` with
/// the labels sorted.
fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

/// Every series recorded so far with its value: a counter's count, a
/// gauge's value, a histogram's number of samples.
///
/// The debugging recorder hands out what was recorded since its last
/// snapshot (counters and gauges are swapped to 0, histograms drained), so
/// the totals add the snapshots up; gauges are only ever moved up and
/// down by dlock, so their sum is their value.
#[derive(Default)]
struct Totals(BTreeMap<String, (MetricKind, f64)>);

impl Totals {
    fn read(&mut self, snapshotter: &Snapshotter) -> &BTreeMap<String, (MetricKind, f64)> {
        for (key, _unit, _description, value) in snapshotter.snapshot().into_vec() {
            let kind = key.kind();
            let key = key.key();
            let labels: Vec<(&str, &str)> = key.labels().map(|label| (label.key(), label.value())).collect();
            let value = match value {
                DebugValue::Counter(count) => count as f64,
                DebugValue::Gauge(value) => value.into_inner(),
                DebugValue::Histogram(samples) => samples.len() as f64,
            };
            let total = self.0.entry(series(key.name(), &labels)).or_insert((kind, 0.0));
            total.1 += value;
        }
        &self.0
    }
}

/// The total of one series, 0 if it was never recorded.
fn total(metrics: &BTreeMap<String, (MetricKind, f64)>, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .get(&series(name, labels))
        .map_or(0.0, |(_, value)| *value)
}

#[tokio::test(start_paused = true)]
async fn a_scripted_run_is_counted() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().expect("the only recorder of this test binary");
    let mut totals = Totals::default();
    dlock_core::describe_metrics();

    let backend = MemoryBackend::new();
    let locker = Locker::new(backend.clone()).metrics_key_label(true);
    let key = "metrics/scripted";
    let labels = [("backend", "memory"), ("kind", "mutex"), ("key", key)];
    let with = |extra: (&'static str, &'static str)| {
        let mut all = labels.to_vec();
        all.push(extra);
        all
    };

    // N = 4 uncontended acquisitions, each released.
    for _ in 0..4 {
        let guard = locker.lock(key).await.expect("free");
        guard.release().await.expect("release");
    }

    // M = 3 contended requests: one waits and gets the lock, one single
    // attempt is refused, one waits until its limit runs out.
    let holder = locker.lock(key).await.expect("free");
    let waiter = {
        let locker = locker.clone();
        tokio::spawn(async move { locker.lock(key).wait(Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let during = totals.read(&snapshotter).clone();
    assert_eq!(
        during
            .get(&series("dlock_waiting_requests", &labels))
            .map(|(_, v)| *v),
        Some(1.0),
        "one request waits: {during:#?}"
    );
    assert!(matches!(
        locker.try_lock(key).await,
        Err(LockError::Contended { .. })
    ));
    holder.release().await.expect("release");
    let second = waiter.await.expect("task").expect("acquired after the release");
    let timed_out = locker.lock(key).wait(Duration::from_millis(100)).await;
    assert!(
        matches!(timed_out, Err(LockError::Timeout { .. })),
        "{timed_out:?}"
    );
    second.release().await.expect("release");

    // A held lock renewed once, released.
    let renewed = locker.lock(key).ttl(Duration::from_secs(3)).await.expect("free");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(renewed.is_held());
    renewed.release().await.expect("release");

    // One loss by expiry: no auto-renewal, and the TTL runs out.
    let expiring = locker
        .lock(key)
        .ttl(Duration::from_secs(1))
        .auto_renew(false)
        .await
        .expect("free");
    tokio::time::timeout(Duration::from_secs(5), expiring.lost())
        .await
        .expect("lost once the TTL ran out");
    drop(expiring);
    locker.wait_for_cleanup().await;

    let metrics = totals.read(&snapshotter).clone();
    let value = |name: &str, labels: &[(&str, &str)]| total(&metrics, name, labels);
    // 4 + the waiter + 1 renewed + 1 expiring + the holder = 8.
    assert_eq!(value("dlock_acquisitions_total", &labels), 8.0, "{metrics:#?}");
    assert_eq!(value("dlock_contended_total", &labels), 3.0, "{metrics:#?}");
    assert_eq!(
        value("dlock_acquire_duration_seconds", &with(("outcome", "acquired"))),
        8.0
    );
    assert_eq!(
        value("dlock_acquire_duration_seconds", &with(("outcome", "contended"))),
        1.0
    );
    assert_eq!(
        value("dlock_acquire_duration_seconds", &with(("outcome", "timeout"))),
        1.0
    );
    // The waits: the waiter's (acquired) and the one that timed out.
    assert_eq!(
        value("dlock_wait_duration_seconds", &with(("outcome", "acquired"))),
        1.0
    );
    assert_eq!(
        value("dlock_wait_duration_seconds", &with(("outcome", "timeout"))),
        1.0
    );
    assert_eq!(
        value("dlock_lost_total", &with(("reason", "expired"))),
        1.0,
        "{metrics:#?}"
    );
    assert_eq!(value("dlock_lost_total", &with(("reason", "taken"))), 0.0);
    assert!(
        value("dlock_renewals_total", &with(("outcome", "ok"))) >= 1.0,
        "{metrics:#?}"
    );
    assert_eq!(value("dlock_renewals_total", &with(("outcome", "failed"))), 0.0);
    // Every guard's hold ended: 7 released and the one lost.
    assert_eq!(value("dlock_hold_duration_seconds", &labels), 8.0);
    assert_eq!(value("dlock_releases_total", &labels), 7.0);
    assert_eq!(
        value("dlock_backend_errors_total", &with(("operation", "acquire"))),
        0.0
    );
    // And the gauges are back to 0.
    assert_eq!(
        metrics.get(&series("dlock_held_locks", &labels)),
        Some(&(MetricKind::Gauge, 0.0))
    );
    assert_eq!(
        metrics.get(&series("dlock_waiting_requests", &labels)),
        Some(&(MetricKind::Gauge, 0.0))
    );

    // Backend errors: the memory backend's fault injection makes the next
    // calls fail as an unreachable server would.
    backend.set_unavailable(true);
    let refused = locker.try_lock(key).await;
    assert!(
        matches!(refused, Err(LockError::Unavailable { .. })),
        "{refused:?}"
    );
    backend.set_unavailable(false);
    let metrics = totals.read(&snapshotter);
    let errors = total(
        metrics,
        "dlock_backend_errors_total",
        &with(("operation", "acquire")),
    );
    assert_eq!(errors, 1.0, "{metrics:#?}");
    let errored = total(
        metrics,
        "dlock_acquire_duration_seconds",
        &with(("outcome", "error")),
    );
    assert_eq!(errored, 1.0);
}
