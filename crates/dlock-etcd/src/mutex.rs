//! The fair mutex, step by step as the protocol reads: stand in the queue
//! (write the waiter key, or check it after a wait, in one transaction that
//! also reads the head), take the lock when first, or watch only the
//! predecessor's deletion.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dlock_core::backend::{
    AcquireRequest, Attempt, Busy, Grant, OwnerToken, ReleaseEvents, ensure_same_kind,
};
use dlock_core::{FencingToken, LockError, LockKind, drift_allowance};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::names::kind_of_name;
use crate::session::Session;
use crate::txn::{first_kv, queue_read, transact};
use crate::{Binding, EtcdBackend, Held};

/// Where a waiter key stands after an attempt.
pub(crate) struct Place {
    /// The key's create revision (the fencing token once it is first).
    pub(crate) revision: i64,
    /// The cluster's revision when the queue was read.
    pub(crate) read_at: i64,
    /// The key is the oldest in the queue: the lock is ours.
    pub(crate) is_first: bool,
    /// The oldest keys of the queue, as read with it (name, create
    /// revision), oldest first.
    pub(crate) ahead: Vec<(String, i64)>,
}

impl EtcdBackend {
    /// Writes the request's waiter key (first attempt) or checks it is
    /// still there on the session's lease (after a wait), and reads the
    /// head of the queue in the same transaction. The key holds the owner
    /// token, or an election candidate's value (as etcd's own elections
    /// do, so that their tools read it).
    pub(crate) async fn stand_in_queue(
        &self,
        request: &AcquireRequest<'_>,
        waiter: &str,
        known: Option<i64>,
        session: &Session,
        oldest: GetOptions,
    ) -> Result<Place, LockError> {
        let (key, owner) = (request.key, request.owner);
        let value = match request.kind {
            LockKind::Election => request.value(),
            _ => owner.as_str(),
        };
        let lease = session.lease;
        let queue = self.queue_prefix(key);
        if known.is_none() {
            self.update_entry(owner, |entry| entry.lease = Some(lease));
        }
        let txn = match known {
            // First attempt: queue up, and read the oldest waiter. The
            // marker's absence: a write that arrives after the request gave
            // up under an unknown outcome changes nothing (see `leave_queue`).
            None => Txn::new()
                .when([
                    Compare::create_revision(waiter, CompareOp::Equal, 0),
                    Compare::create_revision(self.abandoned_marker(waiter), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(waiter, value, Some(PutOptions::new().with_lease(lease))),
                    TxnOp::get(queue.as_str(), Some(oldest.clone())),
                ])
                .or_else([TxnOp::get(waiter, None), TxnOp::get(queue.as_str(), Some(oldest))]),
            // After a wait: our key must still be the one we wrote, on the
            // lease whose validity a grant would report.
            Some(revision) => Txn::new()
                .when([
                    Compare::create_revision(waiter, CompareOp::Equal, revision),
                    Compare::lease(waiter, CompareOp::Equal, lease),
                ])
                .and_then([TxnOp::get(queue.as_str(), Some(oldest.clone()))])
                .or_else([TxnOp::get(waiter, None), TxnOp::get(queue.as_str(), Some(oldest))]),
        };
        let response = self
            .call(key, "queueing", |client| transact(client, &txn))
            .await?;
        let header_revision = response.header().map_or(0, |header| header.revision());
        let responses = response.op_responses();
        // The lease our key is on, when it is not the session's.
        let mut on_lease = lease;
        let (my_revision, first) = match (known, response.succeeded()) {
            (None, true) => (header_revision, queue_read(&responses, 1)),
            // The name is taken: by this request's own write, which a
            // retried attempt finds, or by a write of an earlier request
            // that reached the cluster after that request had given up.
            (None, false) => match first_kv(&responses, 0) {
                Some(mine) if mine.value() == value.as_bytes() => {
                    on_lease = mine.lease();
                    (mine.create_revision(), queue_read(&responses, 1))
                }
                Some(stale_key) => {
                    if let Some(mut stale) = self.take_waiting(owner) {
                        // Dropped: deleted in the background, then freed.
                        stale.revision = Some(stale_key.create_revision());
                    }
                    return Err(LockError::unavailable(
                        Some(key),
                        "a waiter key left by an earlier request was in the way (it is being deleted); \
                         the request queues again under another name if its wait allows",
                    ));
                }
                None => {
                    return Err(LockError::unavailable(
                        Some(key),
                        "the waiter key vanished while queueing",
                    ));
                }
            },
            (Some(revision), true) => (revision, queue_read(&responses, 0)),
            (Some(revision), false) => match first_kv(&responses, 0) {
                // Ours, on an older session's lease (that session was given
                // up): moved onto the current one below.
                Some(mine) if mine.create_revision() == revision => {
                    on_lease = mine.lease();
                    (revision, queue_read(&responses, 1))
                }
                // Our key expired (its lease ended) or was deleted while we
                // waited: never report success on a key that is gone.
                _ => return Err(self.waiter_key_gone(key, owner)),
            },
        };
        self.update_entry(owner, |entry| entry.revision = Some(my_revision));
        if on_lease != lease && !self.rebind_key(key, waiter, my_revision, lease).await? {
            return Err(self.waiter_key_gone(key, owner));
        }

        let is_first = first
            .first()
            .is_some_and(|(head, revision)| head == waiter && *revision == my_revision);
        Ok(Place {
            revision: my_revision,
            read_at: header_revision,
            is_first,
            ahead: first,
        })
    }

    /// The waiter key is first: the lock is ours, on the session (with
    /// auto-renewal) or on a lease of its own that runs out.
    pub(crate) async fn grant(
        &self,
        request: &AcquireRequest<'_>,
        waiter: String,
        place: Place,
        session: Arc<Session>,
        started: Instant,
    ) -> Result<Attempt, LockError> {
        let (key, owner, ttl) = (request.key, request.owner, request.ttl);
        let (my_revision, header_revision) = (place.revision, place.read_at);
        let token = FencingToken::new(u64::try_from(my_revision).unwrap_or(0));
        let (binding, valid_until) = if request.auto_renew {
            let valid_until = session.state().valid_until;
            (Binding::Session(session), valid_until)
        } else {
            // A lease of its own that runs out: move the key onto it
            // (same key, same create revision, so the same token).
            let sent = Instant::now();
            let (id, lease_ttl) = self.own_lease(key, ttl).await?;
            match self.rebind_key(key, &waiter, my_revision, id).await {
                Ok(true) => (Binding::Own { id, ttl: lease_ttl }, sent + lease_ttl),
                outcome => {
                    self.revoke_later(id);
                    outcome?;
                    return Err(LockError::unavailable(
                        Some(key),
                        "the lock key vanished just after it was granted",
                    ));
                }
            }
        };
        let Some(name) = self.take_waiting(owner) else {
            return Err(LockError::unavailable(
                Some(key),
                "the request was abandoned while it acquired",
            ));
        };
        let validity = valid_until
            .saturating_duration_since(started)
            .saturating_sub(drift_allowance(ttl));
        let held = Held {
            binding: Mutex::new(binding),
            name,
        };
        let signal = self.watch_deletion(waiter, header_revision.max(my_revision));
        Ok(Attempt::Acquired(
            Grant::new(token, validity)
                .with_handle(held)
                .with_loss_signal(signal),
        ))
    }

    /// A single attempt that found the lock busy leaves nothing behind.
    pub(crate) async fn leave_at_once(
        &self,
        key: &str,
        owner: &OwnerToken,
        waiter: &str,
        my_revision: i64,
    ) -> Result<Attempt, LockError> {
        // try_lock: leave the queue at once.
        let delete = Txn::new()
            .when([Compare::create_revision(waiter, CompareOp::Equal, my_revision)])
            .and_then([TxnOp::delete(waiter, None)]);
        self.call(key, "leaving the queue", |client| transact(client, &delete))
            .await?;
        if let Some(left) = self.take_waiting(owner) {
            left.mark_gone();
        }
        Ok(Attempt::Busy(Busy::new()))
    }

    /// Refuses `asked_as` when a key read from the queue stands for
    /// another kind or limit; `waiter` (at `revision`) leaves the queue first.
    pub(crate) async fn refuse_other_kinds(
        &self,
        key: &str,
        asked_as: LockKind,
        ahead: &[(String, i64)],
        leaving: (&OwnerToken, &str, i64),
    ) -> Result<(), LockError> {
        let prefix = self.queue_prefix(key);
        for (name, _) in ahead {
            if let Err(error) = ensure_same_kind(key, kind_of_name(&prefix, name), asked_as) {
                let (owner, waiter, revision) = leaving;
                self.leave_at_once(key, owner, waiter, revision).await?;
                return Err(error);
            }
        }
        Ok(())
    }

    /// Waits on the immediate predecessor's deletion only, so that a
    /// release wakes exactly the next waiter; with `admissions`, also on
    /// its key's write (a semaphore waiter admitted after waiting writes
    /// its key once, see `semaphore.rs`). The predecessor is the newest
    /// older key of the whole queue, or of the part of it that ends before
    /// `range_end` (a reader waits for the writers only, see `rwlock.rs`).
    pub(crate) async fn watch_predecessor(
        &self,
        key: &str,
        my_revision: i64,
        ttl: Duration,
        admissions: bool,
        range_end: Option<String>,
    ) -> Result<Attempt, LockError> {
        let among = match range_end {
            Some(end) => GetOptions::new().with_range(end),
            None => GetOptions::new().with_prefix(),
        };
        let predecessor = among
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_max_create_revision(my_revision - 1)
            .with_limit(1)
            .with_keys_only();
        let found = self
            .read_queue(key, "finding the predecessor", predecessor)
            .await?;
        let Some(before) = found.kvs().first() else {
            // It left between our two reads: look again at once.
            return Ok(Attempt::Busy(Busy::new().retry_after(Duration::ZERO)));
        };
        let watched = String::from_utf8_lossy(before.key()).into_owned();
        let seen = found.header().map_or(my_revision, |header| header.revision());
        let (sender, receiver) = mpsc::channel(1);
        let deleted = if admissions {
            self.inner.watches.change(watched, seen)
        } else {
            self.watch_deletion(watched, seen)
        };
        tokio::spawn(async move {
            tokio::select! {
                () = sender.closed() => {}
                () = deleted => { let _ = sender.try_send(()); }
            }
        });
        // The predecessor's key cannot outlive its lease; our TTL is a
        // reasonable bound for a re-check if the watch itself fails.
        Ok(Attempt::Busy(
            Busy::new()
                .wake(ReleaseEvents::from_channel(receiver))
                .retry_after(ttl),
        ))
    }
}
