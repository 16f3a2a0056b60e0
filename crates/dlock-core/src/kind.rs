//! The kinds of lock a key can be used as.

use std::fmt;

use crate::error::LockError;

/// The kind of lock asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockKind {
    /// One holder at a time: a mutex, and the writer of a read-write lock
    /// ([`Locker::lock`](crate::Locker::lock)).
    Exclusive,
    /// One of any number of readers that share the key while no writer
    /// ([`LockKind::Exclusive`]) holds it ([`Locker::read_lock`](crate::Locker::read_lock)).
    /// Each reader is a lease of its own; once a writer waits, new readers
    /// queue behind it.
    Shared,
    /// One of at most `permits` leases on the key at once (a counting
    /// semaphore, [`Locker::semaphore`](crate::Locker::semaphore)). Each
    /// permit is a lease of its own; the limit is stored with the key.
    Semaphore {
        /// The limit, validated (1 to [`MAX_PERMITS`](crate::MAX_PERMITS)).
        permits: u32,
    },
    /// A candidate's lease in a leader election
    /// ([`Locker::election`](crate::Locker::election)): one leader at a
    /// time, whose lease carries a public value; the lease's fencing token
    /// is the leader's term.
    Election,
}

impl fmt::Display for LockKind {
    /// How messages name the kind: "a mutex", "a read lock", "a semaphore
    /// of 4 permits".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockKind::Exclusive => f.write_str("a mutex"),
            LockKind::Shared => f.write_str("a read lock"),
            LockKind::Semaphore { permits: 1 } => f.write_str("a semaphore of 1 permit"),
            LockKind::Semaphore { permits } => write!(f, "a semaphore of {permits} permits"),
            LockKind::Election => f.write_str("an election"),
        }
    }
}

impl LockKind {
    /// Whether leases of this kind and of `other` may stand on one key (at
    /// different times, or together when both are readers): a mutex and a
    /// read lock are the two sides of one read-write lock.
    pub fn same_family(self, other: LockKind) -> bool {
        let read_write = |kind| matches!(kind, LockKind::Exclusive | LockKind::Shared);
        self == other || (read_write(self) && read_write(other))
    }
}

/// For backends: refuses a request of one kind on a key in use as another: a mutex or a
/// read lock on a semaphore's key and back, or anything but a candidate on
/// an election's key and back ([`LockError::WrongKind`]), or a
/// semaphore with another limit than the one its permits were taken with
/// ([`LockError::InvalidOptions`], naming both). A mutex and a read lock
/// are one read-write lock: never refused on each other's key.
pub fn ensure_same_kind(key: &str, held_as: LockKind, asked_as: LockKind) -> Result<(), LockError> {
    match (held_as, asked_as) {
        (held, asked) if held.same_family(asked) => Ok(()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_and_writers_share_keys_and_no_other_kind_mixes() {
        let semaphore = LockKind::Semaphore { permits: 3 };
        assert!(ensure_same_kind("k", LockKind::Shared, LockKind::Exclusive).is_ok());
        assert!(ensure_same_kind("k", LockKind::Exclusive, LockKind::Shared).is_ok());
        let mixes = [
            (LockKind::Shared, semaphore),
            (semaphore, LockKind::Shared),
            (LockKind::Election, LockKind::Exclusive),
            (LockKind::Exclusive, LockKind::Election),
            (LockKind::Shared, LockKind::Election),
            (LockKind::Election, semaphore),
        ];
        for (held, asked) in mixes {
            let error = ensure_same_kind("k", held, asked).err();
            assert!(matches!(error, Some(LockError::WrongKind { .. })), "{error:?}");
        }
        let error = ensure_same_kind("k", semaphore, LockKind::Semaphore { permits: 4 }).err();
        assert!(
            matches!(error, Some(LockError::InvalidOptions { .. })),
            "{error:?}"
        );
    }
}
