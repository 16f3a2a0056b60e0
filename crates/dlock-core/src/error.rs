//! The one error type of the library.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::token::FencingToken;

/// A boxed error from a backend's driver, kept as the source of
/// [`LockError::Unavailable`] so that no driver type shows in this crate's API.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Why a lock that a guard believed it held turned out not to be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotHeldReason {
    /// The lease ran out (or was ended from outside) and nobody holds the key now.
    Expired,
    /// Another owner holds the key now.
    OtherOwner,
}

impl fmt::Display for NotHeldReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotHeldReason::Expired => f.write_str("its lease had already expired"),
            NotHeldReason::OtherOwner => f.write_str("another owner holds it now"),
        }
    }
}

/// Everything that can go wrong when taking, keeping or giving back a lock.
///
/// Every message names the key involved and says what to do about it.
/// The enum is `#[non_exhaustive]`: match the variants you handle and keep a
/// wildcard arm.
///
/// ```
/// use dlock_core::LockError;
///
/// let error = LockError::Contended { key: "orders/42".into() };
/// assert!(error.to_string().contains("orders/42"));
/// assert!(error.is_retryable_later());
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// A single attempt (`try_lock`) found the key held by another owner.
    #[error("lock `{key}` is held by another owner; try again later, or use `lock()` to wait for it")]
    Contended {
        /// The key that was asked for.
        key: String,
    },

    /// `lock()` gave up because its `.wait()` ran out before the key was free.
    #[error(
        "lock `{key}` was not acquired within {waited:?}; raise `.wait()` or find out why the holder keeps it so long"
    )]
    Timeout {
        /// The key that was asked for.
        key: String,
        /// How long the request waited.
        waited: Duration,
    },

    /// The lock was lost while it was in use: the lease ended or another owner took it.
    ///
    /// Stop touching the protected resource; acquire again if the work must go on.
    #[error(
        "lock `{key}` (fencing token {token}) was lost while in use; stop using the resource, and acquire the lock again if the work must go on"
    )]
    Lost {
        /// The key of the lost lock.
        key: String,
        /// The fencing token the lost lock carried.
        token: FencingToken,
    },

    /// An owner-checked operation (release, extend) found that the lock was no longer ours.
    #[error(
        "lock `{key}` (fencing token {token}) is no longer held by this owner: {reason}; writes made under it must be fenced by the token"
    )]
    NotHeld {
        /// The key of the lock.
        key: String,
        /// The fencing token of the guard that tried the operation.
        token: FencingToken,
        /// What the backend found instead of our ownership.
        reason: NotHeldReason,
    },

    /// The key is not acceptable (empty, too long, control characters, ...).
    #[error("invalid lock key {key:?}: {reason}")]
    InvalidKey {
        /// The key as given (cut short when it is very long).
        key: String,
        /// What is wrong with it and what is allowed.
        reason: String,
    },

    /// An option (TTL, wait, extension, backend setting) is out of range.
    #[error("invalid options{}: {reason}", for_key(.key))]
    InvalidOptions {
        /// The key the options were meant for; `None` for backend settings.
        key: Option<String>,
        /// What is wrong and what is allowed.
        reason: String,
    },

    /// The key holds a value that this library did not write, or of the wrong type.
    ///
    /// dlock never overwrites such a value.
    #[error(
        "lock key `{key}` holds a value that dlock did not write ({found}); it was left untouched: use another key or key prefix, or delete the stale value"
    )]
    ForeignValue {
        /// The key, as the user named it.
        key: String,
        /// What was found there.
        found: String,
    },

    /// The key is in use as another kind of lock (a mutex asked for as a
    /// semaphore, or the other way round). dlock never mixes kinds on a key.
    #[error(
        "lock `{key}` is in use as {held_as} and was asked for as {asked_as}; use one kind per key (another key or key prefix for the other kind)"
    )]
    WrongKind {
        /// The key, as the user named it.
        key: String,
        /// The kind the key is in use as, e.g. "a mutex".
        held_as: String,
        /// The kind that was asked for.
        asked_as: String,
    },

    /// A task that holds a read lock on the key asked for its write lock
    /// ([`Locker::lock`](crate::Locker::lock)) with no wait limit. The
    /// writer would wait for every reader to leave, this task's own read
    /// lock included, and new readers would queue behind it: the key would
    /// stay locked for good. dlock has no upgrade: give the read lock back
    /// first, then take the write lock and check again what was read (it
    /// may have changed in between), or take the write lock from the start.
    #[error(
        "lock `{key}`: this task holds a read lock on it and asked for the write lock without a wait limit, which would wait for itself forever (no upgrade); release the read lock first, then take the write lock and re-check what you read, or take the write lock from the start"
    )]
    UpgradeRefused {
        /// The key, as the user named it.
        key: String,
    },

    /// The backend cannot be reached or cannot decide (I/O, connection, no quorum, timeout).
    #[error("{}", unavailable_message(.key.as_deref(), .message))]
    Unavailable {
        /// The key of the operation, when there was one.
        key: Option<String>,
        /// What failed, with node names where the backend has several.
        message: String,
        /// The driver's error, when there was one.
        #[source]
        source: Option<BoxError>,
    },

    /// The backend does not offer the asked-for kind of lock or operation.
    #[error("{what} is not supported by this backend{}", for_key(.key))]
    Unsupported {
        /// The key of the operation; `None` for a backend setting.
        key: Option<String>,
        /// The feature that was asked for.
        what: String,
    },
}

/// ` for `key``, or nothing: how a message names the key when there is one.
fn for_key(key: &Option<String>) -> String {
    key.as_deref()
        .map(|key| format!(" for `{key}`"))
        .unwrap_or_default()
}

fn unavailable_message(key: Option<&str>, message: &str) -> String {
    match key {
        Some(key) => format!("lock backend unavailable for `{key}`: {message}"),
        None => format!("lock backend unavailable: {message}"),
    }
}

impl LockError {
    /// An [`LockError::Unavailable`] with a message and no source.
    pub fn unavailable(key: Option<&str>, message: impl Into<String>) -> Self {
        LockError::Unavailable {
            key: key.map(str::to_owned),
            message: message.into(),
            source: None,
        }
    }

    /// An [`LockError::Unavailable`] that keeps the driver's error as its source.
    pub fn unavailable_with(
        key: Option<&str>,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        LockError::Unavailable {
            key: key.map(str::to_owned),
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// An [`LockError::InvalidOptions`]; `key` is `None` for a backend setting.
    pub fn invalid_options(key: Option<&str>, reason: impl Into<String>) -> Self {
        LockError::InvalidOptions {
            key: key.map(str::to_owned),
            reason: reason.into(),
        }
    }

    /// An [`LockError::Unsupported`]; `key` is `None` for a backend setting.
    pub fn unsupported(key: Option<&str>, what: impl Into<String>) -> Self {
        LockError::Unsupported {
            key: key.map(str::to_owned),
            what: what.into(),
        }
    }

    /// The key the error is about, when it is about one.
    ///
    /// The one rule for keys in this enum: a variant that is always about a
    /// key has a `key: String`; one that may be about a backend setting or a
    /// connection instead has a `key: Option<String>`, and `None` means "no
    /// key" (never an empty string).
    pub fn key(&self) -> Option<&str> {
        match self {
            LockError::Contended { key }
            | LockError::Timeout { key, .. }
            | LockError::Lost { key, .. }
            | LockError::NotHeld { key, .. }
            | LockError::InvalidKey { key, .. }
            | LockError::ForeignValue { key, .. }
            | LockError::WrongKind { key, .. }
            | LockError::UpgradeRefused { key } => Some(key),
            LockError::InvalidOptions { key, .. }
            | LockError::Unsupported { key, .. }
            | LockError::Unavailable { key, .. } => key.as_deref(),
        }
    }

    /// Whether the same call may succeed later without any change by the caller
    /// (the key was busy, or the backend was unreachable).
    pub fn is_retryable_later(&self) -> bool {
        matches!(
            self,
            LockError::Contended { .. } | LockError::Timeout { .. } | LockError::Unavailable { .. }
        )
    }
}
