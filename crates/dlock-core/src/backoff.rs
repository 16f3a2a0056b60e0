//! Jittered exponential delays for retries that have no better hint.

use std::time::Duration;

/// Jittered exponential delays for a retry loop that has no better hint
/// (no TTL to wait out, no notification): a reconnect, a clean-up that the
/// server refused, a watch stream that broke.
///
/// The step doubles from `first` up to `cap`; each delay is drawn from the
/// upper half of the current step, so that clients that failed together do
/// not all retry at the same instant. [`reset`](Self::reset) after a success
/// starts again from `first`.
///
/// Every retry loop in dlock's libraries uses this one helper, so that
/// their behaviour under an outage is the same and tested once.
///
/// ```
/// use std::time::Duration;
/// use dlock_core::backend::Backoff;
///
/// let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
/// let first = backoff.next_delay();
/// assert!(first >= Duration::from_millis(25) && first <= Duration::from_millis(50));
/// for _ in 0..10 {
///     assert!(backoff.next_delay() <= Duration::from_secs(2));
/// }
/// backoff.reset();
/// assert!(backoff.next_delay() <= Duration::from_millis(50));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    step: Duration,
    cap: Duration,
}

impl Backoff {
    /// Delays that start at `first` and double up to `cap`.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first: first.min(cap),
            step: first.min(cap),
            cap,
        }
    }

    /// The next delay to wait before retrying, in `[step/2, step]`; the step
    /// then doubles, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.cap);
        jitter_upper_half(step)
    }

    /// Starts again from the first delay (after a success).
    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

/// A delay in `[d/2, d]`.
pub(crate) fn jitter_upper_half(delay: Duration) -> Duration {
    let half = delay / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(fastrand::u64(0..=nanos))
}

/// A small random extra in `[0, min(d/10, 4 ms) + 1 ms]`, added to a known
/// wake-up time so that many waiters with the same hint do not all ask at
/// the same instant. Capped: a lease's end is known to the millisecond, and
/// a dead leader's successor should not wait tens of milliseconds past it.
pub(crate) fn small_jitter(delay: Duration) -> Duration {
    let spread = (delay / 10).min(Duration::from_millis(4)) + Duration::from_millis(1);
    let nanos = u64::try_from(spread.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_in_the_upper_half() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let steps = [10, 20, 40, 80, 80, 80];
        for step in steps {
            let step = Duration::from_millis(step);
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} not in [{:?}, {step:?}]",
                step / 2
            );
        }
    }

    #[test]
    fn small_jitter_is_bounded() {
        for _ in 0..100 {
            let extra = small_jitter(Duration::from_millis(100));
            assert!(extra <= Duration::from_millis(5));
            let extra = small_jitter(Duration::from_millis(10));
            assert!(extra <= Duration::from_millis(2));
        }
    }
}
