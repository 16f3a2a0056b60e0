//! What an operator may see of a lock: held or not, for how long, and the
//! last fencing token; never the owner's secret.

use std::time::Duration;

use crate::kind::LockKind;

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
    /// The kind the key is in use as, when the backend knows.
    pub kind: Option<LockKind>,
    /// How many leases are held on the key (a semaphore's permits taken),
    /// when the backend knows.
    pub holders: Option<usize>,
}

impl KeyStatus {
    /// Nobody holds the key; add what else the backend knows.
    ///
    /// ```
    /// use dlock_core::KeyStatus;
    ///
    /// let status = KeyStatus::free().last_token(41).waiting(0);
    /// assert!(!status.held);
    /// assert_eq!(status.last_token, Some(41));
    /// ```
    pub fn free() -> Self {
        KeyStatus::default()
    }

    /// Someone holds the key; add what else the backend knows.
    ///
    /// ```
    /// use std::time::Duration;
    /// use dlock_core::KeyStatus;
    ///
    /// let status = KeyStatus::held().remaining(Duration::from_secs(9)).last_token(42);
    /// assert!(status.held);
    /// assert_eq!(status.remaining, Some(Duration::from_secs(9)));
    /// ```
    pub fn held() -> Self {
        KeyStatus {
            held: true,
            ..KeyStatus::default()
        }
    }

    /// How long the holder's lease still runs.
    pub fn remaining(mut self, remaining: Duration) -> Self {
        self.remaining = Some(remaining);
        self
    }

    /// The highest fencing token handed out so far (or the holder's).
    pub fn last_token(mut self, token: u64) -> Self {
        self.last_token = Some(token);
        self
    }

    /// How many acquisitions wait in line.
    pub fn waiting(mut self, waiting: usize) -> Self {
        self.waiting = Some(waiting);
        self
    }

    /// The kind the key is in use as.
    pub fn kind(mut self, kind: LockKind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// How many leases are held on the key.
    pub fn holders(mut self, holders: usize) -> Self {
        self.holders = Some(holders);
        self
    }
}
