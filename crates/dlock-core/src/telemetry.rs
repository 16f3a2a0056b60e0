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
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "metrics")]
use std::sync::{Arc, OnceLock};
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

/// What a locker puts on every metric: its backend's name, whether keys
/// are labels, and (feature `metrics`) the meters of key-less requests,
/// built once per kind so a request does not allocate for its labels.
/// Cheap to clone: locker clones share the built meters.
#[derive(Clone)]
pub(crate) struct Meters {
    pub(crate) backend: &'static str,
    pub(crate) key_label: bool,
    #[cfg(feature = "metrics")]
    by_kind: Arc<[OnceLock<Meter>; 4]>,
}

impl Meters {
    pub(crate) fn new(backend: &'static str) -> Meters {
        Meters {
            backend,
            key_label: false,
            #[cfg(feature = "metrics")]
            by_kind: Arc::default(),
        }
    }

    /// The meter of a request of `kind` on `key`; `name` is the request's
    /// own metrics name, which stands in for the key.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn meter(&self, kind: LockKind, key: &str, name: Option<&str>) -> Meter {
        #[cfg(feature = "metrics")]
        {
            let key_label = match name {
                Some(name) => Some(name),
                None if self.key_label => Some(key),
                None => None,
            };
            match key_label {
                Some(key_label) => Meter::with_labels(self.backend, kind, Some(key_label)),
                None => {
                    let slot = match kind {
                        LockKind::Exclusive => 0,
                        LockKind::Shared => 1,
                        LockKind::Semaphore { .. } => 2,
                        LockKind::Election => 3,
                    };
                    self.by_kind[slot]
                        .get_or_init(|| Meter::with_labels(self.backend, kind, None))
                        .clone()
                }
            }
        }
        #[cfg(not(feature = "metrics"))]
        Meter {}
    }
}

/// Where each recording goes: a metric and, for some, the value of its
/// extra label. Its index is the place of its [`metrics::Key`] in a meter.
#[cfg(feature = "metrics")]
#[derive(Clone, Copy)]
enum Series {
    Acquire(AcquireOutcome),
    Wait(AcquireOutcome),
    Hold,
    Acquisitions,
    Contended,
    Renewals { ok: bool },
    Lost(LossReason),
    Held,
    Waiting,
    BackendErrors(Operation),
    Releases,
}

#[cfg(feature = "metrics")]
const SERIES: usize = 24;

#[cfg(feature = "metrics")]
impl Series {
    fn index(self) -> usize {
        match self {
            Series::Acquire(outcome) => outcome as usize,
            Series::Wait(outcome) => 4 + outcome as usize,
            Series::Hold => 8,
            Series::Acquisitions => 9,
            Series::Contended => 10,
            Series::Renewals { ok } => 11 + usize::from(ok),
            Series::Lost(reason) => 13 + reason as usize,
            Series::Held => 16,
            Series::Waiting => 17,
            Series::BackendErrors(operation) => 18 + operation as usize,
            Series::Releases => 23,
        }
    }

    fn name_and_extra_label(self) -> (&'static str, Option<(&'static str, &'static str)>) {
        match self {
            Series::Acquire(outcome) => (ACQUIRE_DURATION, Some(("outcome", outcome.as_str()))),
            Series::Wait(outcome) => (WAIT_DURATION, Some(("outcome", outcome.as_str()))),
            Series::Hold => (HOLD_DURATION, None),
            Series::Acquisitions => (ACQUISITIONS, None),
            Series::Contended => (CONTENDED, None),
            Series::Renewals { ok } => (RENEWALS, Some(("outcome", if ok { "ok" } else { "failed" }))),
            Series::Lost(reason) => (LOST, Some(("reason", reason.as_str()))),
            Series::Held => (HELD, None),
            Series::Waiting => (WAITING, None),
            Series::BackendErrors(operation) => (BACKEND_ERRORS, Some(("operation", operation.as_str()))),
            Series::Releases => (RELEASES, None),
        }
    }
}

/// The facade's macros pass the same kind of metadata: where the metric
/// comes from, at level INFO.
#[cfg(feature = "metrics")]
static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The labels of one request and of the guard it yields, and the calls
/// that record its metrics. Cheap to clone.
///
/// Each recording looks its series' handle up in the recorder installed
/// at that moment (the facade's no-op one when none is), by a
/// [`metrics::Key`] built at its first use and kept: a recording
/// allocates nothing, and a recorder installed after the locker was built
/// still gets everything recorded from then on.
#[derive(Clone)]
pub(crate) struct Meter {
    #[cfg(feature = "metrics")]
    series: Arc<MeterSeries>,
}

#[cfg(feature = "metrics")]
struct MeterSeries {
    labels: Vec<metrics::Label>,
    keys: [OnceLock<metrics::Key>; SERIES],
}

impl Meter {
    #[cfg(feature = "metrics")]
    fn with_labels(backend: &'static str, kind: LockKind, key: Option<&str>) -> Meter {
        let mut labels = vec![
            metrics::Label::from_static_parts("backend", backend),
            metrics::Label::from_static_parts("kind", kind_label(kind)),
        ];
        if let Some(key) = key {
            labels.push(metrics::Label::new("key", key.to_owned()));
        }
        Meter {
            series: Arc::new(MeterSeries {
                labels,
                keys: std::array::from_fn(|_| OnceLock::new()),
            }),
        }
    }

    #[cfg(feature = "metrics")]
    fn key(&self, series: Series) -> &metrics::Key {
        self.series.keys[series.index()].get_or_init(|| {
            let (name, extra) = series.name_and_extra_label();
            let mut labels = self.series.labels.clone();
            if let Some((label, value)) = extra {
                labels.push(metrics::Label::from_static_parts(label, value));
            }
            metrics::Key::from_parts(name, labels)
        })
    }

    #[cfg(feature = "metrics")]
    fn counter(&self, series: Series) -> metrics::Counter {
        metrics::with_recorder(|recorder| recorder.register_counter(self.key(series), &METADATA))
    }

    #[cfg(feature = "metrics")]
    fn gauge(&self, series: Series) -> metrics::Gauge {
        metrics::with_recorder(|recorder| recorder.register_gauge(self.key(series), &METADATA))
    }

    #[cfg(feature = "metrics")]
    fn histogram(&self, series: Series) -> metrics::Histogram {
        metrics::with_recorder(|recorder| recorder.register_histogram(self.key(series), &METADATA))
    }

    /// A request ended with `outcome` after `elapsed`, which is also the
    /// time it `waited` if it found the lock taken and waited for it.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn request_ended(&self, outcome: AcquireOutcome, elapsed: Duration, waited: bool) {
        #[cfg(feature = "metrics")]
        {
            if waited {
                self.histogram(Series::Wait(outcome))
                    .record(elapsed.as_secs_f64());
            }
            self.histogram(Series::Acquire(outcome))
                .record(elapsed.as_secs_f64());
            if outcome == AcquireOutcome::Acquired {
                self.counter(Series::Acquisitions).increment(1);
            }
        }
    }

    /// A request found the lock taken at its first attempt.
    pub(crate) fn contended(&self) {
        #[cfg(feature = "metrics")]
        self.counter(Series::Contended).increment(1);
    }

    /// A request starts waiting; it counts in `dlock_waiting_requests`
    /// until the mark is dropped (the request ended or was cancelled).
    pub(crate) fn waiting(&self) -> WaitingMark {
        #[cfg(feature = "metrics")]
        self.gauge(Series::Waiting).increment(1.0);
        WaitingMark { meter: self.clone() }
    }

    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn renewal(&self, ok: bool) {
        #[cfg(feature = "metrics")]
        self.counter(Series::Renewals { ok }).increment(1);
    }

    /// Passes a backend's `answer` on, counting it in
    /// `dlock_backend_errors_total` if it says the backend could not be
    /// reached or failed ([`LockError::Unavailable`]); answers such as "not
    /// held" or "wrong kind" are not backend errors.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn backend_answer<T>(
        &self,
        answer: Result<T, LockError>,
        operation: Operation,
    ) -> Result<T, LockError> {
        #[cfg(feature = "metrics")]
        if matches!(answer, Err(LockError::Unavailable { .. })) {
            self.counter(Series::BackendErrors(operation)).increment(1);
        }
        answer
    }

    pub(crate) fn released(&self) {
        #[cfg(feature = "metrics")]
        self.counter(Series::Releases).increment(1);
    }

    /// A guard starts holding: it counts in `dlock_held_locks` until
    /// [`Holding::end`].
    pub(crate) fn holding(&self) -> Holding {
        #[cfg(feature = "metrics")]
        self.gauge(Series::Held).increment(1.0);
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
        self.meter.gauge(Series::Waiting).decrement(1.0);
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
            self.meter.gauge(Series::Held).decrement(1.0);
            self.meter
                .histogram(Series::Hold)
                .record(self.since.elapsed().as_secs_f64());
        }
    }

    /// The guard turned lost for `reason`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn lost(&self, reason: LossReason) {
        #[cfg(feature = "metrics")]
        self.meter.counter(Series::Lost(reason)).increment(1);
        self.end();
    }
}

#[cfg(all(test, feature = "metrics"))]
mod tests {
    use super::*;

    #[test]
    fn every_series_has_a_key_slot_of_its_own() {
        let outcomes = [
            AcquireOutcome::Acquired,
            AcquireOutcome::Contended,
            AcquireOutcome::Timeout,
            AcquireOutcome::Error,
        ];
        let operations = [
            Operation::Acquire,
            Operation::Renew,
            Operation::Extend,
            Operation::Release,
            Operation::Proclaim,
        ];
        let mut all = vec![
            Series::Hold,
            Series::Acquisitions,
            Series::Contended,
            Series::Renewals { ok: true },
            Series::Renewals { ok: false },
            Series::Held,
            Series::Waiting,
            Series::Releases,
        ];
        all.extend(outcomes.map(Series::Acquire));
        all.extend(outcomes.map(Series::Wait));
        all.extend([LossReason::Taken, LossReason::Expired, LossReason::Unreachable].map(Series::Lost));
        all.extend(operations.map(Series::BackendErrors));
        let mut slots: Vec<usize> = all.iter().map(|series| series.index()).collect();
        slots.sort_unstable();
        assert_eq!(slots, (0..SERIES).collect::<Vec<_>>());
    }

    #[test]
    fn a_key_carries_the_meters_labels_and_its_own() {
        let meters = Meters::new("memory");
        let meter = meters.meter(LockKind::Shared, "orders/1", Some("orders"));
        let key = meter.key(Series::Lost(LossReason::Expired));
        assert_eq!(key.name(), LOST);
        let labels: Vec<(&str, &str)> = key.labels().map(|label| (label.key(), label.value())).collect();
        assert_eq!(
            labels,
            [
                ("backend", "memory"),
                ("kind", "read"),
                ("key", "orders"),
                ("reason", "expired")
            ]
        );
        let keyless = meters.meter(LockKind::Shared, "orders/1", None);
        assert!(
            Arc::ptr_eq(
                &keyless.series,
                &meters.meter(LockKind::Shared, "orders/2", None).series
            ),
            "requests without a key label share their kind's meter"
        );
        assert_eq!(keyless.key(Series::Held).labels().count(), 2);
    }
}
