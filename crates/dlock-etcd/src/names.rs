//! Waiter key names: the kind they stand for, and their reuse.
//!
//! A name is `{queue prefix}{client part}-{slot}`. The client part tells
//! the kind: a mutex's is the backend's hex client id, a semaphore's
//! `s{permits}.{client id}`, a reader's `~r.{client id}`, an election
//! candidate's `e.{client id}`, so every keys-only read of a queue sees the
//! kind (and limit) of the keys in it.
//!
//! etcd keeps a deleted key's name in its index until the history is
//! compacted, and every acquisition reads the queue with a range over the
//! lock's prefix, which walks those names too. A fresh name per
//! acquisition would make each acquisition of a busy key slower than the
//! one before (measured: a median cycle from 2.8 ms to 5.9 ms over 8 000
//! acquisitions of one key on an uncompacted cluster). So a backend names
//! its waiter keys `{client id}-{slot}` and takes the lowest slot of the
//! lock that none of its acquisitions is using.
//!
//! Architecture Invariant: a name is reserved from the first write of an
//! acquisition until its key is known to be gone (deleted, or found gone
//! by an owner check), and is freed at most once; a name whose first write
//! had an unknown outcome when it was given up is fenced by a marker and
//! never freed (see `EtcdBackend::leave_queue`). So a name never stands
//! for two live keys, and the owner checks (which compare the create
//! revision, new for every key written under a name) keep their meaning.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError, Weak};

use dlock_core::LockKind;
use tracing::debug;

use crate::{EtcdBackend, Inner};

/// What the client part of a reader's waiter key name starts with (`~r.`).
/// `~` sorts after the hex of a mutex's names and the `s` of a semaphore's,
/// so a range read of a queue that ends at it sees every key but the
/// readers' (see `rwlock.rs`).
pub(crate) const READERS_START: char = '~';

/// What the client part of a semaphore's waiter key names starts with.
const SEMAPHORE_NAME: char = 's';

/// What the client part of an election candidate's key names starts with.
const CANDIDATE_NAME: &str = "e.";

/// The client part of waiter key names for `kind` (see the module docs).
pub(crate) fn name_client(kind: LockKind, client_id: &str) -> String {
    match kind {
        LockKind::Semaphore { permits } => format!("{SEMAPHORE_NAME}{permits}.{client_id}"),
        LockKind::Shared => format!("{READERS_START}r.{client_id}"),
        LockKind::Election => format!("{CANDIDATE_NAME}{client_id}"),
        _ => client_id.to_owned(),
    }
}

/// The kind of lock a waiter key under `queue_prefix` stands for. A name
/// of hex digits alone is a key of etcd's own election (or mutex) from
/// the `concurrency` package, `etcdctl elect` for one, which names each
/// campaigner's key after its lease id: a fellow candidate.
pub(crate) fn kind_of_name(queue_prefix: &str, name: &str) -> LockKind {
    let rest = name.strip_prefix(queue_prefix).unwrap_or_default();
    if rest.starts_with(READERS_START) {
        return LockKind::Shared;
    }
    let etcd_own = !rest.is_empty() && rest.bytes().all(|byte| byte.is_ascii_hexdigit());
    if rest.starts_with(CANDIDATE_NAME) || etcd_own {
        return LockKind::Election;
    }
    let permits = rest
        .strip_prefix(SEMAPHORE_NAME)
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(permits, _)| permits.parse().ok());
    match permits {
        Some(permits) => LockKind::Semaphore { permits },
        None => LockKind::Exclusive,
    }
}

/// The names in use by one backend's acquisitions.
#[derive(Default)]
pub(crate) struct Reserved(Mutex<HashSet<String>>);

impl Reserved {
    /// Reserves the lowest free slot of the queue `queue_prefix` for `client`.
    pub(crate) fn take(&self, queue_prefix: &str, client: &str) -> String {
        let mut reserved = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut slot = 0u64;
        loop {
            let name = format!("{queue_prefix}{client}-{slot}");
            if !reserved.contains(&name) {
                reserved.insert(name.clone());
                return name;
            }
            slot += 1;
        }
    }

    pub(crate) fn free(&self, name: &str) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).remove(name);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

const LIVE: u8 = 0;
const GONE: u8 = 1;
/// A background task frees the name (after deleting the key, or once the
/// key is gone by itself).
const HANDED_OFF: u8 = 2;
/// The key is gone and the name fenced against a late write: never reused.
const RETIRED: u8 = 3;

/// One acquisition's waiter key name. Dropped while its key may still
/// exist, it deletes the key in the background and frees the name once
/// that is confirmed; dropped after [`mark_gone`](Self::mark_gone), it
/// frees the name at once; after [`keep_until_gone`](Self::keep_until_gone),
/// a task frees it when the key goes by itself.
pub(crate) struct WaiterName {
    key: String,
    name: String,
    /// Create revision of our key under this name, once known: the
    /// background delete compares on it.
    pub(crate) revision: Option<i64>,
    /// The lease the first write named, once sent.
    pub(crate) lease: Option<i64>,
    state: AtomicU8,
    backend: Weak<Inner>,
}

impl WaiterName {
    pub(crate) fn new(key: &str, name: String, backend: Weak<Inner>) -> Self {
        WaiterName {
            key: key.to_owned(),
            name,
            revision: None,
            lease: None,
            state: AtomicU8::new(LIVE),
            backend,
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.name
    }

    /// Our key under this name is known to be gone.
    pub(crate) fn mark_gone(&self) {
        let _ = self
            .state
            .compare_exchange(LIVE, GONE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Our key under this name is gone, and the name fenced: it is never
    /// freed.
    pub(crate) fn retire(&self) {
        let _ = self
            .state
            .compare_exchange(LIVE, RETIRED, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Starts deleting the key in the background now (a release failed);
    /// the task frees the name when the key is gone.
    pub(crate) fn delete_later(&self) {
        if self.hand_off() {
            if let Some(backend) = self.backend_in_runtime() {
                backend.delete_in_background(&self.key, self.name.clone(), self.revision, self.lease);
            }
        }
    }

    /// The lock was given up without a release (forgotten, or dropped once
    /// lost): its key stays until its lease ends or someone deletes it, and
    /// the name is freed then. With `expire_in`, the key first moves onto a
    /// lease of that many seconds that nobody keeps alive.
    pub(crate) fn keep_until_gone(&self, expire_in: Option<i64>) {
        if self.hand_off() {
            if let (Some(backend), Some(revision)) = (self.backend_in_runtime(), self.revision) {
                backend.free_when_gone(&self.key, self.name.clone(), revision, expire_in);
            }
        }
    }

    fn hand_off(&self) -> bool {
        self.state
            .compare_exchange(LIVE, HANDED_OFF, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The backend, if it and a runtime to run a task on are still there.
    /// Without them the name stays reserved (never reused), which is safe.
    fn backend_in_runtime(&self) -> Option<EtcdBackend> {
        let inner = self.backend.upgrade()?;
        if tokio::runtime::Handle::try_current().is_err() {
            debug!(key = %self.key, "waiter key dropped outside a Tokio runtime; its name is not reused");
            return None;
        }
        Some(EtcdBackend { inner })
    }
}

impl Drop for WaiterName {
    fn drop(&mut self) {
        match self.state.load(Ordering::Acquire) {
            GONE => {
                if let Some(inner) = self.backend.upgrade() {
                    inner.reserved.free(&self.name);
                }
            }
            LIVE => self.delete_later(),
            // A background task frees the name.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_free_slot_is_taken_and_freed_slots_come_back() {
        let reserved = Reserved::default();
        let first = reserved.take("/q/", "c");
        let second = reserved.take("/q/", "c");
        assert_eq!((first.as_str(), second.as_str()), ("/q/c-0", "/q/c-1"));
        assert_eq!(reserved.take("/other/", "c"), "/other/c-0");
        reserved.free(&first);
        assert_eq!(reserved.take("/q/", "c"), "/q/c-0");
        assert_eq!(reserved.take("/q/", "c"), "/q/c-2");
        assert_eq!(reserved.len(), 4);
    }

    #[test]
    fn names_tell_the_kind_and_the_limit() {
        let prefix = "/dlock/6/orders/";
        let client = "0123456789abcdef0123456789abcdef";
        let semaphore = LockKind::Semaphore { permits: 12 };
        let name = format!("{prefix}{}-3", name_client(semaphore, client));
        assert_eq!(kind_of_name(prefix, &name), semaphore);
        let name = format!("{prefix}{}-0", name_client(LockKind::Exclusive, client));
        assert_eq!(kind_of_name(prefix, &name), LockKind::Exclusive);
        let name = format!("{prefix}{}-1", name_client(LockKind::Shared, client));
        assert_eq!(kind_of_name(prefix, &name), LockKind::Shared);
    }
}
