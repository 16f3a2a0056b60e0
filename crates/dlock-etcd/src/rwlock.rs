//! The read-write lock: readers stand in the mutex's queue beside the
//! writers (the mutex itself, unchanged).
//!
//! A writer holds the key when its key is the oldest of the queue, as a
//! mutex does, so it waits for every older reader. A reader holds the key
//! when no writer's key is older than its own. Keys only leave the queue,
//! so a reader admitted stays admitted, and a reader that comes while a
//! writer waits stands behind it: writer preference, in arrival order.
//!
//! A reader's waiter key is named `~r.{client}-{slot}`. `~` sorts after
//! the hex of a mutex's names and the `s` of a semaphore's, so one range
//! read from the queue prefix up to `~` sees every key but the readers':
//! a reader's attempt reads the oldest of those in the transaction that
//! writes its key (a writer older than it keeps it out; a semaphore's key
//! is refused), and a waiting reader watches the newest older one. So all
//! the readers behind a writer wake on its release together, and a writer
//! behind readers is woken by each deletion of its predecessor, the last
//! reader's included.

use dlock_core::backend::{AcquireRequest, Attempt};
use dlock_core::{LockError, LockKind};
use etcd_client::{GetOptions, SortOrder, SortTarget};
use tokio::time::Instant;

use crate::EtcdBackend;
use crate::names::READERS_START;

/// The end of the range of `queue_prefix`'s keys that are not readers'.
fn before_readers(queue_prefix: &str) -> String {
    format!("{queue_prefix}{READERS_START}")
}

impl EtcdBackend {
    /// One attempt at a read lock on `request.key`.
    pub(crate) async fn try_acquire_shared(
        &self,
        request: &AcquireRequest<'_>,
    ) -> Result<Attempt, LockError> {
        let started = Instant::now();
        let (key, owner, ttl) = (request.key, request.owner, request.ttl);
        let (waiter, known) = self.queue_entry(key, owner, LockKind::Shared);
        let session = self.session(key, ttl).await?;
        let others = before_readers(&self.queue_prefix(key));
        let oldest_other = GetOptions::new()
            .with_range(others.as_str())
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1)
            .with_keys_only();
        let place = self
            .stand_in_queue(request, &waiter, known, &session, oldest_other)
            .await?;
        self.refuse_other_kinds(
            key,
            LockKind::Shared,
            &place.ahead,
            (owner, &waiter, place.revision),
        )
        .await?;
        let writer_ahead = place
            .ahead
            .first()
            .is_some_and(|(_, revision)| *revision < place.revision);
        if !writer_ahead {
            return self.grant(request, waiter, place, session, started).await;
        }
        if !request.queue {
            return self.leave_at_once(key, owner, &waiter, place.revision).await;
        }
        // Woken when the newest writer ahead leaves.
        self.watch_predecessor(key, place.revision, ttl, false, Some(others))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::name_client;

    #[test]
    fn the_range_before_readers_holds_writers_and_semaphores_only() {
        let queue = "/dlock/7/catalog/";
        let end = before_readers(queue);
        let client = "0123456789abcdefffffffffffffffff";
        let name = |kind| format!("{queue}{}-0", name_client(kind, client));
        for kind in [LockKind::Exclusive, LockKind::Semaphore { permits: 99 }] {
            let name = name(kind);
            assert!(
                name.as_str() >= queue && name < end,
                "{name} must be in the range"
            );
        }
        assert!(
            name(LockKind::Shared) >= end,
            "a reader's key must be out of the range"
        );
    }
}
