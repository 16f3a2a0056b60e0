//! Leader election, in the layout of etcd's own (`concurrency.Election`,
//! which `etcdctl elect` uses): every candidate has a key under the
//! election's prefix, on its session's lease, whose value is the
//! candidate's public value; the oldest key (lowest create revision) leads,
//! and its create revision is the term. So etcd's tools see dlock's leader
//! and dlock sees theirs: `etcdctl elect --listen` on the queue prefix
//! without its last `/` prints what a dlock leader proclaimed, and a
//! campaign by `etcdctl elect` queues with dlock's candidates.
//!
//! A candidate queues exactly as a mutex's waiter does (see `mutex.rs`:
//! the same transaction, the same watch on the predecessor only), under a
//! name that marks it as a candidate (`names.rs`). What elections add is
//! here: proclaiming (an owner-checked write of the value on the same
//! key), reading the leader, and a watch on the whole prefix for
//! observers, which fires on any campaign, proclamation, resignation or
//! lease expiry.

use dlock_core::backend::{LeaderState, Lease, ProclaimOutcome, ReleaseEvents, ensure_same_kind};
use dlock_core::{FencingToken, LockError, LockKind, NotHeldReason};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp};
use tokio::sync::mpsc;

use crate::names::kind_of_name;
use crate::txn::{held_by_other, oldest_waiter, transact};
use crate::{EtcdBackend, Held};

impl EtcdBackend {
    /// Writes `value` on the leader's key if it is still the key this
    /// lease wrote (same create revision), keeping its lease.
    pub(crate) async fn proclaim_value(
        &self,
        lease: &Lease,
        value: &str,
    ) -> Result<ProclaimOutcome, LockError> {
        let key = lease.key();
        let Some(held) = lease.handle::<Held>() else {
            return Ok(ProclaimOutcome::NotHeld(NotHeldReason::Expired));
        };
        let waiter = held.name.as_str();
        let revision = i64::try_from(lease.token().get()).unwrap_or(i64::MAX);
        // Only the leader proclaims: its key must be the oldest, which it
        // stays once it is (keys only leave the queue).
        let txn = Txn::new()
            .when([Compare::create_revision(waiter, CompareOp::Equal, revision)])
            .and_then([TxnOp::put(
                waiter,
                value,
                Some(PutOptions::new().with_ignore_lease()),
            )])
            .or_else([TxnOp::get(self.queue_prefix(key), Some(oldest_waiter()))]);
        let response = self
            .call(key, "proclaiming", |client| transact(client, &txn))
            .await?;
        if response.succeeded() {
            return Ok(ProclaimOutcome::Proclaimed);
        }
        Ok(ProclaimOutcome::NotHeld(held_by_other(&response.op_responses())))
    }

    /// The oldest key of the election's queue: its value and create
    /// revision. A key of another kind there is `WrongKind`.
    pub(crate) async fn read_leader(&self, key: &str) -> Result<Option<LeaderState>, LockError> {
        let oldest = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_limit(1);
        let found = self.read_queue(key, "reading the leader", oldest).await?;
        let Some(leader) = found.kvs().first() else {
            return Ok(None);
        };
        let name = String::from_utf8_lossy(leader.key());
        ensure_same_kind(
            key,
            kind_of_name(&self.queue_prefix(key), &name),
            LockKind::Election,
        )?;
        let term = FencingToken::new(u64::try_from(leader.create_revision()).unwrap_or(0));
        let value = String::from_utf8_lossy(leader.value()).into_owned();
        // No lease end: etcd deletes the key when its lease ends, and the
        // watch on the prefix tells observers at once.
        Ok(Some(LeaderState::new(value, term, None)))
    }

    /// Wakes on every change under `key`'s queue prefix from now on: one
    /// watch at a time on the backend's stream, each started from the
    /// revision the last one fired at, so that nothing is missed between.
    pub(crate) async fn watch_queue(&self, key: &str) -> Result<ReleaseEvents, LockError> {
        let now = self
            .read_queue(key, "starting a watch", oldest_waiter())
            .await?
            .header()
            .map_or(0, |header| header.revision());
        let (sender, receiver) = mpsc::channel(1);
        let backend = std::sync::Arc::downgrade(&self.inner);
        let prefix = self.queue_prefix(key);
        tokio::spawn(async move {
            let mut after = now;
            loop {
                let Some(inner) = backend.upgrade() else { return };
                let change = inner.watches.change_under(prefix.clone(), after);
                drop(inner);
                tokio::select! {
                    () = sender.closed() => return,
                    revision = change.revision() => {
                        if revision == 0 {
                            // Refused (no permission to watch, say): the
                            // observers' lease-end and safety re-reads remain.
                            return;
                        }
                        after = after.max(revision);
                        // A full channel already holds a wake-up: one is enough.
                        if let Err(mpsc::error::TrySendError::Closed(())) = sender.try_send(()) {
                            return;
                        }
                    }
                }
            }
        });
        Ok(ReleaseEvents::from_channel(receiver))
    }
}
