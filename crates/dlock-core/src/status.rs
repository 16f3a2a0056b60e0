//! What an operator may see of a lock: held or not, for how long, and the
//! last fencing token; never the owner's secret.

use std::time::Duration;

/// A lock as seen from outside, for tools (`dlock status`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyStatus {
    /// Someone holds the lock now.
    pub held: bool,
    /// How long the holder's lease still runs, when the backend knows.
    pub remaining: Option<Duration>,
    /// The highest fencing token handed out for the key so far (Redis,
    /// Redlock) or the holder's token (etcd), when known.
    pub last_token: Option<u64>,
    /// How many acquisitions wait in line (backends with a queue).
    pub waiting: Option<usize>,
}

impl KeyStatus {
    /// A status with every field given.
    pub fn new(
        held: bool,
        remaining: Option<Duration>,
        last_token: Option<u64>,
        waiting: Option<usize>,
    ) -> Self {
        KeyStatus {
            held,
            remaining,
            last_token,
            waiting,
        }
    }
}
