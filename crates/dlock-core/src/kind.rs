//! The kinds of lock a key can be used as.

use std::fmt;

use crate::error::LockError;

/// The kind of lock asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockKind {
    /// One holder at a time (a mutex).
    Exclusive,
    /// One of at most `permits` leases on the key at once (a counting
    /// semaphore, [`Locker::semaphore`](crate::Locker::semaphore)). Each
    /// permit is a lease of its own; the limit is stored with the key.
    Semaphore {
        /// The limit, validated (1 to [`MAX_PERMITS`](crate::MAX_PERMITS)).
        permits: u32,
    },
}

impl fmt::Display for LockKind {
    /// How messages name the kind: "a mutex", "a semaphore of 4 permits".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockKind::Exclusive => f.write_str("a mutex"),
            LockKind::Semaphore { permits: 1 } => f.write_str("a semaphore of 1 permit"),
            LockKind::Semaphore { permits } => write!(f, "a semaphore of {permits} permits"),
        }
    }
}

/// For backends: refuses a request of one kind on a key in use as another: a mutex on a
/// semaphore's key and back ([`LockError::WrongKind`]), or a semaphore with
/// another limit than the one its permits were taken with
/// ([`LockError::InvalidOptions`], naming both).
pub fn ensure_same_kind(key: &str, held_as: LockKind, asked_as: LockKind) -> Result<(), LockError> {
    match (held_as, asked_as) {
        (held, asked) if held == asked => Ok(()),
        (LockKind::Semaphore { permits: held }, LockKind::Semaphore { permits: asked }) => {
            Err(LockError::invalid_options(
                Some(key),
                format!(
                    "the semaphore is held with a limit of {held} permits and was asked for with {asked}; every client must use the same limit"
                ),
            ))
        }
        (held, asked) => Err(LockError::WrongKind {
            key: key.to_owned(),
            held_as: held.to_string(),
            asked_as: asked.to_string(),
        }),
    }
}
