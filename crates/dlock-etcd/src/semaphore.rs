//! The counting semaphore: the mutex's queue with `permits` holders.
//!
//! Waiter keys stand in the key's queue, ordered by create revision, as
//! for the mutex; a key holds a permit while fewer than `permits` keys
//! are older. Keys only leave the queue, so a key's place only moves
//! forward: once it holds a permit it keeps it until its own key goes. Its
//! create revision is its fencing token, above every token before it.
//!
//! A semaphore's waiter keys are named `s{permits}.{client}-{slot}` (see
//! `names.rs`), so that every read of the queue, keys only, tells the kind
//! and the limit of the keys it sees: a mutex on a semaphore's key, a
//! semaphore on a mutex's, or a semaphore with another limit is refused
//! before it can be granted.
//!
//! Waking: the first waiter (exactly `permits` keys ahead) watches every
//! holder's key, so the release or expiry of any permit wakes it and it
//! alone. Every later waiter watches its predecessor for a deletion or a
//! write: a waiter admitted after waiting writes its key once, which tells
//! the one behind it that it is now first.

use std::time::Duration;

use dlock_core::LockError;
use dlock_core::backend::{AcquireRequest, Attempt, Busy, ReleaseEvents};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::EtcdBackend;
use crate::txn::oldest_waiters;

impl EtcdBackend {
    /// One attempt at a permit of the semaphore `request.key`.
    pub(crate) async fn try_acquire_permit(
        &self,
        request: &AcquireRequest<'_>,
        permits: u32,
    ) -> Result<Attempt, LockError> {
        let started = Instant::now();
        let (key, owner, ttl, kind) = (request.key, request.owner, request.ttl, request.kind);
        let (waiter, known) = self.queue_entry(key, owner, kind);
        let session = self.session(key, ttl).await?;
        let holders = permits as usize;
        let read = oldest_waiters(i64::from(permits) + 1);
        let place = self
            .stand_in_queue(request, &waiter, known, &session, read)
            .await?;
        self.refuse_other_kinds(key, kind, &place.ahead, (owner, &waiter, place.revision))
            .await?;
        let position = place
            .ahead
            .iter()
            .position(|(name, revision)| *name == waiter && *revision == place.revision);
        if position.is_some_and(|index| index < holders) {
            if known.is_some() && request.auto_renew {
                // Admitted after waiting: one write of our key tells the
                // waiter behind us that it is first now. (Without renewal
                // the grant moves the key to a lease of its own, a write too.)
                self.rebind_key(key, &waiter, place.revision, session.lease)
                    .await?;
            }
            return self.grant(request, waiter, place, session, started).await;
        }
        if !request.queue {
            return self.leave_at_once(key, owner, &waiter, place.revision).await;
        }
        if position == Some(holders) {
            let holder_keys = place.ahead[..holders].iter().map(|(name, _)| name.clone());
            return Ok(self.watch_holders(holder_keys, place.read_at, ttl));
        }
        // A later waiter: woken when its predecessor leaves or is admitted.
        self.watch_predecessor(key, place.revision, ttl, true, None).await
    }

    /// The first waiter: woken by the deletion of any holder's key.
    fn watch_holders(&self, holder_keys: impl Iterator<Item = String>, seen: i64, ttl: Duration) -> Attempt {
        let (sender, receiver) = mpsc::channel(1);
        for holder in holder_keys {
            let deleted = self.watch_deletion(holder, seen);
            let sender = sender.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = sender.closed() => {}
                    () = deleted => { let _ = sender.try_send(()); }
                }
            });
        }
        Attempt::Busy(
            Busy::new()
                .wake(ReleaseEvents::from_channel(receiver))
                .retry_after(ttl),
        )
    }
}
