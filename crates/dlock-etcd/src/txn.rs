//! Transactions and reads shared by the lock operations: owner checks,
//! moving a key to another lease, the queue head.

use std::time::Duration;

use dlock_core::{LockError, NotHeldReason};
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, GetResponse, KeyValue, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};

use crate::{EtcdBackend, whole_seconds};

impl EtcdBackend {
    /// Reads `key`'s queue (a prefix read with `options`), failing over
    /// between members like every request.
    pub(crate) async fn read_queue(
        &self,
        key: &str,
        doing: &str,
        options: GetOptions,
    ) -> Result<GetResponse, LockError> {
        let queue = self.queue_prefix(key);
        self.call(key, doing, |mut client| {
            let (queue, options) = (queue.clone(), options.clone());
            async move { client.get(queue, Some(options)).await }
        })
        .await
    }

    /// A lease of its own for a lock without renewal: its id and TTL.
    pub(crate) async fn own_lease(&self, key: &str, ttl: Duration) -> Result<(i64, Duration), LockError> {
        let granted = self
            .call(key, "granting a lease", |mut client| async move {
                client.lease_grant(whole_seconds(ttl), None).await
            })
            .await?;
        Ok((
            granted.id(),
            Duration::from_secs(u64::try_from(granted.ttl()).unwrap_or(1).max(1)),
        ))
    }

    /// Moves our key onto `lease` if it is still ours; false if it is gone.
    /// The value stays (an owner token, or an election's proclaimed value).
    pub(crate) async fn rebind_key(
        &self,
        key: &str,
        waiter: &str,
        revision: i64,
        lease: i64,
    ) -> Result<bool, LockError> {
        let txn = Txn::new()
            .when([Compare::create_revision(waiter, CompareOp::Equal, revision)])
            .and_then([TxnOp::put(
                waiter,
                "",
                Some(PutOptions::new().with_lease(lease).with_ignore_value()),
            )]);
        let response = self
            .call(key, "moving the lock to another lease", |client| {
                transact(client, &txn)
            })
            .await?;
        Ok(response.succeeded())
    }

    /// `None` if our key is still there (on `lease`, when given: the lease
    /// whose validity the caller reports), else why not.
    pub(crate) async fn check_ours(
        &self,
        key: &str,
        waiter: &str,
        revision: i64,
        lease: Option<i64>,
    ) -> Result<Option<NotHeldReason>, LockError> {
        let mut compares = vec![Compare::create_revision(waiter, CompareOp::Equal, revision)];
        if let Some(lease) = lease {
            compares.push(Compare::lease(waiter, CompareOp::Equal, lease));
        }
        let txn = Txn::new()
            .when(compares)
            .or_else([TxnOp::get(self.queue_prefix(key), Some(oldest_waiter()))]);
        let response = self
            .call(key, "checking the lock", |client| transact(client, &txn))
            .await?;
        if response.succeeded() {
            return Ok(None);
        }
        Ok(Some(held_by_other(&response.op_responses())))
    }

    /// Why a lock we no longer have is not ours: someone holds it now, or nobody.
    pub(crate) async fn why_not_held(&self, key: &str) -> Result<NotHeldReason, LockError> {
        let found = self.read_queue(key, "reading the queue", oldest_waiter()).await?;
        Ok(if found.kvs().is_empty() {
            NotHeldReason::Expired
        } else {
            NotHeldReason::OtherOwner
        })
    }
}

/// A Get of the oldest waiter key under a queue prefix (the holder).
pub(crate) fn oldest_waiter() -> GetOptions {
    oldest_waiters(1)
}

/// From a failed owner check's Get of the queue head: someone else holds
/// the lock, or nobody does.
pub(crate) fn held_by_other(responses: &[TxnOpResponse]) -> NotHeldReason {
    if first_kv(responses, 0).is_some() {
        NotHeldReason::OtherOwner
    } else {
        NotHeldReason::Expired
    }
}

/// Sends a transaction (a copy, so that a retry on another member can send it again).
pub(crate) async fn transact(
    mut client: Client,
    txn: &Txn,
) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
    client.txn(txn.clone()).await
}

/// The first kv of a Get inside a transaction's responses.
pub(crate) fn first_kv(responses: &[TxnOpResponse], index: usize) -> Option<&KeyValue> {
    match responses.get(index) {
        Some(TxnOpResponse::Get(get)) => get.kvs().first(),
        _ => None,
    }
}

/// The keys a Get inside a transaction's responses read: name and create
/// revision, in the order read.
pub(crate) fn queue_read(responses: &[TxnOpResponse], index: usize) -> Vec<(String, i64)> {
    match responses.get(index) {
        Some(TxnOpResponse::Get(get)) => get
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.create_revision(),
                )
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A Get of the `count` oldest waiter keys under a queue prefix.
/// Every key of a queue, oldest first, keys only (for operators).
pub(crate) fn whole_queue() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_keys_only()
}

pub(crate) fn oldest_waiters(count: i64) -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(count)
        .with_keys_only()
}
