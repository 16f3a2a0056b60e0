//! Metrics through the [`metrics`](https://docs.rs/metrics) facade, behind
//! the `metrics` feature. The application installs whatever recorder it
//! exports with; without the feature every call here is an empty inline
//! function, and with it but no recorder installed each is a call into the
//! facade's no-op recorder.
//!
//! The names, units and labels are an interface, listed in one table in
//! `docs/ARCHITECTURE.md` ("Metrics"); [`METRICS`] holds the same list.
//!
//! Architecture Invariant: a request's and a guard's metrics carry the
//! labels `backend` and `kind`, and `key` only when the user asked for it
//! (`Locker::metrics_key_label`, `LockRequest::metrics_name`): a label per
//! key can make a metrics store's series unbounded.

#[cfg(feature = "metrics")]
use std::sync::Arc;
#[cfg(feature = "metrics")]
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::backend::LockKind;
use crate::error::LockError;

/// The metrics dlock records: name, type, unit and what it counts. Each
/// carries the labels `backend` and `kind` (and `key` when opted in); the
/// extra label of some is named in the description.
pub const METRICS: [(&str, &str, &str, &str); 11] = [
    (
        ACQUIRE_DURATION,
        "histogram",
        "seconds",
        "from a request's start to its outcome; label `outcome`: acquired, contended (a single attempt refused), timeout, error",
    ),
    (
        WAIT_DURATION,
        "histogram",
        "seconds",
        "how long requests that found the lock taken waited; label `outcome` as above",
    ),
    (
        HOLD_DURATION,
        "histogram",
        "seconds",
        "from acquisition to release, loss or the guard's end",
    ),
    (ACQUISITIONS, "counter", "", "locks acquired"),
    (
        CONTENDED,
        "counter",
        "",
        "requests that found the lock taken at their first attempt",
    ),
    (
        RENEWALS,
        "counter",
        "",
        "lease renewals; label `outcome`: ok, failed (each failed try)",
    ),
    (
        LOST,
        "counter",
        "",
        "guards that turned lost; label `reason`: taken, expired, unreachable",
    ),
    (HELD, "gauge", "", "guards held by this process now"),
    (
        WAITING,
        "gauge",
        "",
        "requests waiting for a lock in this process now",
    ),
    (
        BACKEND_ERRORS,
        "counter",
        "",
        "calls the backend answered with `Unavailable` (unreachable, failing); label `operation`: acquire, renew, extend, release, proclaim",
    ),
    (RELEASES, "counter", "", "releases that found the lock still ours"),
];

const ACQUIRE_DURATION: &str = "dlock_acquire_duration_seconds";
const WAIT_DURATION: &str = "dlock_wait_duration_seconds";
const HOLD_DURATION: &str = "dlock_hold_duration_seconds";
const ACQUISITIONS: &str = "dlock_acquisitions_total";
const CONTENDED: &str = "dlock_contended_total";
const RENEWALS: &str = "dlock_renewals_total";
const LOST: &str = "dlock_lost_total";
const HELD: &str = "dlock_held_locks";
const WAITING: &str = "dlock_waiting_requests";
const BACKEND_ERRORS: &str = "dlock_backend_errors_total";
const RELEASES: &str = "dlock_releases_total";

/// Registers the units and descriptions of dlock's metrics with the
/// recorder installed now (an exporter prints them as `# HELP` / `# TYPE`
/// lines). Call it once after installing the recorder; metrics are
/// recorded with or without it.
#[cfg(feature = "metrics")]
pub fn describe_metrics() {
    for (name, kind, unit, description) in METRICS {
        let unit = (unit == "seconds").then_some(metrics::Unit::Seconds);
        match (kind, unit) {
            ("histogram", Some(unit)) => metrics::describe_histogram!(name, unit, description),
            ("histogram", None) => metrics::describe_histogram!(name, description),
            ("gauge", _) => metrics::describe_gauge!(name, description),
            _ => metrics::describe_counter!(name, description),
        }
    }
}

/// How a request ended, for `dlock_acquire_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcquireOutcome {
    Acquired,
    Contended,
    Timeout,
    Error,
}

impl AcquireOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AcquireOutcome::Acquired => "acquired",
            AcquireOutcome::Contended => "contended",
            AcquireOutcome::Timeout => "timeout",
            AcquireOutcome::Error => "error",
        }
    }
}

/// Why a guard turned lost, for `dlock_lost_total` and the `lock lost` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LossReason {
    /// Another owner holds the key now.
    Taken,
    /// The lease ran out: nobody renewed it in time (auto-renewal off, or
    /// the backend found it gone).
    Expired,
    /// Renewals could not reach the backend before the lease's validity ran out.
    Unreachable,
}

impl LossReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LossReason::Taken => "taken",
            LossReason::Expired => "expired",
            LossReason::Unreachable => "unreachable",
        }
    }
}

/// The backend call an error came from, for `dlock_backend_errors_total`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Operation {
    Acquire,
    Renew,
    Extend,
    Release,
    Proclaim,
}

impl Operation {
    #[cfg(feature = "metrics")]
    fn as_str(self) -> &'static str {
        match self {
            Operation::Acquire => "acquire",
            Operation::Renew => "renew",
            Operation::Extend => "extend",
            Operation::Release => "release",
            Operation::Proclaim => "proclaim",
        }
    }
}

/// The label `kind` of a lock kind.
pub(crate) fn kind_label(kind: LockKind) -> &'static str {
    match kind {
        LockKind::Exclusive => "mutex",
        LockKind::Shared => "read",
        LockKind::Semaphore { .. } => "semaphore",
        LockKind::Election => "election",
    }
}

/// What a locker puts on every metric: its backend's name, and whether
/// keys are labels.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MeterConfig {
    pub(crate) backend: &'static str,
    pub(crate) key_label: bool,
}

/// The labels of one request and of the guard it yields, and the calls
/// that record its metrics. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Meter {
    #[cfg(feature = "metrics")]
    labels: Arc<[metrics::Label]>,
}

impl Meter {
    /// The labels for a request of `kind` on `key`; `name` is the
    /// request's own metrics name, which stands in for the key.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(config: MeterConfig, kind: LockKind, key: &str, name: Option<&str>) -> Meter {
        #[cfg(feature = "metrics")]
        {
            let mut labels = vec![
                metrics::Label::from_static_parts("backend", config.backend),
                metrics::Label::from_static_parts("kind", kind_label(kind)),
            ];
            match name {
                Some(name) => labels.push(metrics::Label::new("key", name.to_owned())),
                None if config.key_label => labels.push(metrics::Label::new("key", key.to_owned())),
                None => {}
            }
            Meter {
                labels: labels.into(),
            }
        }
        #[cfg(not(feature = "metrics"))]
        Meter {}
    }

    #[cfg(feature = "metrics")]
    fn with(&self, label: &'static str, value: &'static str) -> Vec<metrics::Label> {
        let mut labels = self.labels.to_vec();
        labels.push(metrics::Label::from_static_parts(label, value));
        labels
    }

    /// A request ended with `outcome` after `elapsed`; it waited `waited`
    /// if it ever found the lock taken.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn request_ended(&self, outcome: AcquireOutcome, elapsed: Duration, waited: Option<Duration>) {
        #[cfg(feature = "metrics")]
        {
            let labels = self.with("outcome", outcome.as_str());
            if let Some(waited) = waited {
                metrics::histogram!(WAIT_DURATION, labels.clone()).record(waited.as_secs_f64());
            }
            metrics::histogram!(ACQUIRE_DURATION, labels).record(elapsed.as_secs_f64());
            if outcome == AcquireOutcome::Acquired {
                metrics::counter!(ACQUISITIONS, self.labels.to_vec()).increment(1);
            }
        }
    }

    /// A request found the lock taken at its first attempt.
    pub(crate) fn contended(&self) {
        #[cfg(feature = "metrics")]
        metrics::counter!(CONTENDED, self.labels.to_vec()).increment(1);
    }

    /// A request starts waiting; it counts in `dlock_waiting_requests`
    /// until the mark is dropped (the request ended or was cancelled).
    pub(crate) fn waiting(&self) -> WaitingMark {
        #[cfg(feature = "metrics")]
        metrics::gauge!(WAITING, self.labels.to_vec()).increment(1.0);
        WaitingMark { meter: self.clone() }
    }

    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn renewal(&self, ok: bool) {
        #[cfg(feature = "metrics")]
        metrics::counter!(RENEWALS, self.with("outcome", if ok { "ok" } else { "failed" })).increment(1);
    }

    /// Counts `error` in `dlock_backend_errors_total` if it says the
    /// backend could not be reached or failed ([`LockError::Unavailable`]);
    /// answers such as "not held" or "wrong kind" are not backend errors.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn backend_error_if_unreachable(&self, error: &LockError, operation: Operation) {
        #[cfg(feature = "metrics")]
        if matches!(error, LockError::Unavailable { .. }) {
            metrics::counter!(BACKEND_ERRORS, self.with("operation", operation.as_str())).increment(1);
        }
    }

    pub(crate) fn released(&self) {
        #[cfg(feature = "metrics")]
        metrics::counter!(RELEASES, self.labels.to_vec()).increment(1);
    }

    /// A guard starts holding: it counts in `dlock_held_locks` until
    /// [`Holding::end`].
    pub(crate) fn holding(&self) -> Holding {
        #[cfg(feature = "metrics")]
        metrics::gauge!(HELD, self.labels.to_vec()).increment(1.0);
        Holding {
            meter: self.clone(),
            #[cfg(feature = "metrics")]
            since: tokio::time::Instant::now(),
            #[cfg(feature = "metrics")]
            ended: AtomicBool::new(false),
        }
    }
}

/// A waiting request's place in `dlock_waiting_requests`.
pub(crate) struct WaitingMark {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    meter: Meter,
}

impl Drop for WaitingMark {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        metrics::gauge!(WAITING, self.meter.labels.to_vec()).decrement(1.0);
    }
}

/// A guard's place in `dlock_held_locks` and its hold time.
pub(crate) struct Holding {
    meter: Meter,
    #[cfg(feature = "metrics")]
    since: tokio::time::Instant,
    #[cfg(feature = "metrics")]
    ended: AtomicBool,
}

impl Holding {
    pub(crate) fn meter(&self) -> &Meter {
        &self.meter
    }

    /// The guard no longer holds the lock (released, lost, forgotten or
    /// dropped): records the hold time, once.
    pub(crate) fn end(&self) {
        #[cfg(feature = "metrics")]
        if !self.ended.swap(true, Ordering::AcqRel) {
            let labels = self.meter.labels.to_vec();
            metrics::gauge!(HELD, labels.clone()).decrement(1.0);
            metrics::histogram!(HOLD_DURATION, labels).record(self.since.elapsed().as_secs_f64());
        }
    }

    /// The guard turned lost for `reason`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn lost(&self, reason: LossReason) {
        #[cfg(feature = "metrics")]
        metrics::counter!(LOST, self.meter.with("reason", reason.as_str())).increment(1);
        self.end();
    }
}
