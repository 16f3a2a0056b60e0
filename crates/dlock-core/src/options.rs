//! Limits on keys and durations, checked before anything reaches a backend.

use std::time::Duration;

use crate::error::LockError;

/// Longest key accepted, in bytes. Backends add their own prefix on top.
pub const MAX_KEY_LEN: usize = 512;

/// TTL used when a request does not set one: [`TTL_MEDIUM`].
pub const DEFAULT_TTL: Duration = TTL_MEDIUM;

/// 5 s: for short critical sections in services that must not wait long
/// for a holder that crashed (a request handler, a cache refill). With
/// auto-renewal (the default) the lock is held as long as the work runs;
/// the TTL is how long a dead holder keeps others out, and how long a
/// pause (GC, a frozen VM) may last before the lock is lost. Renewal sends
/// one extension every 1.7 s per held lock.
pub const TTL_SHORT: Duration = Duration::from_secs(5);

/// 30 s, the default: for jobs and workers of any length. A crashed holder
/// keeps others out for at most 30 s; a pause of up to about 30 s is
/// survived; one extension every 10 s per held lock.
pub const TTL_MEDIUM: Duration = Duration::from_secs(30);

/// 5 min: for holders that may stall for long (large heaps, batch hosts
/// under load) or that hold without auto-renewal for a known, long piece
/// of work (a migration). A crashed holder keeps others out for up to
/// 5 min, so pair it with work that is rare and not latency-bound.
pub const TTL_LONG: Duration = Duration::from_secs(5 * 60);

/// Shortest TTL accepted. Below this, clock drift and one network round trip
/// eat the whole lease.
pub const MIN_TTL: Duration = Duration::from_millis(10);

/// Longest TTL accepted. A lease is meant to end soon after its holder dies;
/// use auto-renewal to hold a lock longer.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest `.wait()` accepted; leave `.wait()` unset to wait without limit.
pub const MAX_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// The largest semaphore accepted by [`Locker::semaphore`](crate::Locker::semaphore).
/// A backend checks every live permit of a key in one atomic step, so the
/// limit bounds that step's work; a resource shared by more holders than
/// this wants a rate limiter, not a semaphore.
pub const MAX_PERMITS: u32 = 10_000;

/// The longest value a candidate may campaign with or proclaim
/// ([`Election::campaign`](crate::Election::campaign)), in bytes: it is
/// meant for an address or a name, and every observer reads it at each
/// change.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// How much of a lease is held back for clock drift between client and server:
/// 1 % of the TTL plus 2 ms, as in the Redlock analysis.
///
/// A guard counts as held until `acquired_at + ttl - drift_allowance(ttl)`,
/// where `acquired_at` is taken (on a monotonic clock) before the request left.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(dlock_core::drift_allowance(Duration::from_secs(10)), Duration::from_millis(102));
/// ```
pub fn drift_allowance(ttl: Duration) -> Duration {
    ttl / 100 + Duration::from_millis(2)
}

/// Checks a key against the rules every backend relies on.
///
/// A key must be non-empty, at most [`MAX_KEY_LEN`] bytes of UTF-8, and free
/// of control characters (they break log lines and some wire protocols).
///
/// ```
/// assert!(dlock_core::validate_key("orders/42").is_ok());
/// assert!(dlock_core::validate_key("").is_err());
/// ```
pub fn validate_key(key: &str) -> Result<(), LockError> {
    let invalid = |reason: String| LockError::InvalidKey {
        key: preview(key),
        reason,
    };
    if key.is_empty() {
        return Err(invalid(
            "the key is empty; name the resource you lock, e.g. \"orders/42\"".into(),
        ));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(invalid(format!(
            "the key is {} bytes long, the limit is {MAX_KEY_LEN}; hash long names into a shorter key",
            key.len()
        )));
    }
    if let Some(position) = key.chars().position(char::is_control) {
        return Err(invalid(format!(
            "the key has a control character at character {position}; use printable characters only"
        )));
    }
    Ok(())
}

/// Checks a lease length (`.ttl()` or `extend()`).
pub fn validate_ttl(key: &str, ttl: Duration) -> Result<(), LockError> {
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(LockError::invalid_options(
            Some(&preview(key)),
            format!(
                "a TTL of {ttl:?} is out of range; use {MIN_TTL:?} to {MAX_TTL:?} (auto-renewal keeps a lock longer)"
            ),
        ));
    }
    Ok(())
}

/// Checks a backend setting that is a time limit (a connect or request
/// timeout): more than zero and at most `max`.
///
/// ```
/// use std::time::Duration;
/// assert!(dlock_core::validate_timeout("connect timeout", Duration::from_secs(5), Duration::from_secs(300)).is_ok());
/// assert!(dlock_core::validate_timeout("connect timeout", Duration::ZERO, Duration::from_secs(300)).is_err());
/// ```
pub fn validate_timeout(name: &str, value: Duration, max: Duration) -> Result<(), LockError> {
    if value.is_zero() || value > max {
        return Err(LockError::invalid_options(
            None,
            format!("{name} {value:?} is out of range; use 1 ms to {max:?}"),
        ));
    }
    Ok(())
}

/// Checks a `.wait()` duration.
pub fn validate_wait(key: &str, wait: Duration) -> Result<(), LockError> {
    if wait.is_zero() {
        return Err(LockError::invalid_options(
            Some(&preview(key)),
            "a wait of zero asks for a single attempt; use `try_lock` for that",
        ));
    }
    if wait > MAX_WAIT {
        return Err(LockError::invalid_options(
            Some(&preview(key)),
            format!(
                "a wait of {wait:?} is over the limit of {MAX_WAIT:?}; leave `.wait()` unset to wait without limit"
            ),
        ));
    }
    Ok(())
}

/// Checks an election's value (a campaign's or a proclamation's): at most
/// [`MAX_VALUE_LEN`] bytes.
pub fn validate_value(key: &str, value: &str) -> Result<(), LockError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(LockError::invalid_options(
            Some(&preview(key)),
            format!(
                "a value of {} bytes is over the limit of {MAX_VALUE_LEN}; proclaim where to find the data (an address, a name), not the data",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// Checks a semaphore's limit: 1 to [`MAX_PERMITS`].
pub fn validate_permits(key: &str, permits: u32) -> Result<(), LockError> {
    if permits == 0 {
        return Err(LockError::invalid_options(
            Some(&preview(key)),
            "a semaphore of 0 permits could never be acquired; ask for at least 1",
        ));
    }
    if permits > MAX_PERMITS {
        return Err(LockError::invalid_options(
            Some(&preview(key)),
            format!("a semaphore of {permits} permits is over the limit of {MAX_PERMITS}"),
        ));
    }
    Ok(())
}

/// The key as shown in error messages: cut short when it is very long.
pub(crate) fn preview(key: &str) -> String {
    const SHOWN: usize = 64;
    if key.len() <= MAX_KEY_LEN {
        return key.to_owned();
    }
    let mut end = SHOWN;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &key[..end], key.len())
}
