//! Giving waiter keys back: leaving the queue (fenced against a late
//! write), deletes retried in the background, forgotten locks left to run
//! out, and names freed once their keys are gone.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use dlock_core::LockError;
use dlock_core::backend::Backoff;
use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tracing::debug;

use crate::txn::transact;
use crate::{EtcdBackend, Inner};

impl EtcdBackend {
    /// The key that, once written, makes a late write of the waiter key
    /// `waiter` fail (see [`leave_queue`](Self::leave_queue)). Outside
    /// every queue: queue prefixes start with a digit.
    pub(crate) fn abandoned_marker(&self, waiter: &str) -> String {
        format!("{}abandoned/{waiter}", self.inner.prefix)
    }

    /// Deletes the waiter key `waiter`. When the outcome of its first write
    /// is unknown (`revision` is `None`: the request timed out), that write
    /// may still commit after this delete, and leave a key on a kept-alive
    /// session at the head of the queue for as long as this process lives.
    /// So the delete writes the name's marker in the same transaction, on
    /// the lease that write named: a first write compares the marker's
    /// absence, so a late one changes nothing; and the marker goes with
    /// that lease, after which a late write fails anyway (no such lease).
    /// Returns whether the marker was written: the name must then never be
    /// used again.
    pub(crate) async fn leave_queue(
        &self,
        key: &str,
        waiter: &str,
        revision: Option<i64>,
        lease: Option<i64>,
    ) -> Result<bool, LockError> {
        let delete = TxnOp::delete(waiter, None);
        let plain = match revision {
            Some(revision) => Txn::new()
                .when([Compare::create_revision(waiter, CompareOp::Equal, revision)])
                .and_then([delete.clone()]),
            None => Txn::new().and_then([delete.clone()]),
        };
        let Some(lease) = lease.filter(|_| revision.is_none()) else {
            self.call(key, "leaving the queue", |client| transact(client, &plain))
                .await?;
            return Ok(false);
        };
        let marker = self.abandoned_marker(waiter);
        let fenced = Txn::new().and_then([
            TxnOp::put(marker, "", Some(PutOptions::new().with_lease(lease))),
            delete,
        ]);
        let (fenced, plain) = (&fenced, &plain);
        self.call(key, "leaving the queue", |client| async move {
            match transact(client.clone(), fenced).await {
                Ok(_) => Ok(true),
                // The lease is gone: so is any key a late write could make.
                Err(error) if error.to_string().contains("lease not found") => {
                    transact(client, plain).await.map(|_| false)
                }
                Err(error) => Err(error),
            }
        })
        .await
    }

    /// Keeps trying to delete a waiter key that a failed release or
    /// clean-up left behind. It matters here more than with Redis: on a
    /// kept-alive session the key would otherwise block the queue for as
    /// long as the session lives. Stops when the key is gone, or with the
    /// backend (whose sessions then end, and their keys with them). Frees
    /// the name once the key is gone.
    pub(crate) fn delete_in_background(
        &self,
        key: &str,
        waiter: String,
        revision: Option<i64>,
        lease: Option<i64>,
    ) {
        let backend = Arc::downgrade(&self.inner);
        let key = key.to_owned();
        tokio::spawn(async move {
            // The request that failed just now would likely fail again at once.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (key, waiter) = (&key, &waiter);
            let deleted = retry_until(&backend, Duration::from_millis(200), |backend| async move {
                let fenced = backend.leave_queue(key, waiter, revision, lease).await.ok()?;
                if !fenced {
                    backend.inner.reserved.free(waiter);
                }
                Some(())
            });
            if deleted.await.is_some() {
                debug!(key, "a left-over waiter key was deleted");
            }
        });
    }

    /// Frees `waiter`'s name once the key created at `revision` is gone:
    /// at once if it is, else when a watch sees it deleted (its lease ran
    /// out, or someone deleted it). With `expire_in`, first moves the key
    /// onto a lease of that many seconds that is not kept alive. Stops with
    /// the backend.
    pub(crate) fn free_when_gone(&self, key: &str, waiter: String, revision: i64, expire_in: Option<i64>) {
        let backend = Arc::downgrade(&self.inner);
        let key = key.to_owned();
        let first_pause = Duration::from_millis(100);
        tokio::spawn(async move {
            let (key, waiter) = (&key, &waiter);
            if let Some(seconds) = expire_in {
                let ttl = Duration::from_secs(u64::try_from(seconds).unwrap_or(1));
                let moved = retry_until(&backend, first_pause, |backend| async move {
                    let (lease, _) = backend.own_lease(key, ttl).await.ok()?;
                    let rebound = backend.rebind_key(key, waiter, revision, lease).await;
                    if !matches!(rebound, Ok(true)) {
                        backend.revoke_later(lease);
                    }
                    rebound.ok()
                });
                match moved.await {
                    Some(true) => {}
                    // Already gone.
                    Some(false) => return free_name(&backend, waiter),
                    None => return,
                }
            }
            let gone = retry_until(&backend, first_pause, |backend| async move {
                backend.check_ours(key, waiter, revision, None).await.ok()
            });
            let deleted = match gone.await {
                Some(None) => match backend.upgrade() {
                    Some(inner) => EtcdBackend { inner }.watch_deletion(waiter.clone(), revision),
                    None => return,
                },
                Some(Some(_)) => return free_name(&backend, waiter),
                None => return,
            };
            // The watch keeps the connections, not the backend: check now
            // and then that the backend is still there.
            tokio::pin!(deleted);
            loop {
                tokio::select! {
                    () = &mut deleted => break,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {
                        if backend.strong_count() == 0 {
                            return;
                        }
                    }
                }
            }
            free_name(&backend, waiter);
        });
    }

    /// Revokes a lease in the background (it runs out by itself anyway).
    pub(crate) fn revoke_later(&self, id: i64) {
        let members = Arc::clone(&self.inner.members);
        tokio::spawn(async move {
            let _ = members
                .call(Duration::from_secs(2), |mut client| async move {
                    client.lease_revoke(id).await
                })
                .await;
        });
    }
}

/// Runs `step` until it gives `Some`, pausing between tries (from
/// `first_pause`, doubling up to 5 s); `None` once the backend is gone.
pub(crate) async fn retry_until<T, Fut>(
    backend: &Weak<Inner>,
    first_pause: Duration,
    mut step: impl FnMut(EtcdBackend) -> Fut,
) -> Option<T>
where
    Fut: Future<Output = Option<T>>,
{
    let mut backoff = Backoff::new(first_pause, Duration::from_secs(5));
    loop {
        let current = EtcdBackend {
            inner: backend.upgrade()?,
        };
        // Each try gets the backend for itself, so that it is not kept
        // alive while waiting.
        if let Some(done) = step(current).await {
            return Some(done);
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Frees a waiter key name, if the backend is still there.
pub(crate) fn free_name(backend: &Weak<Inner>, name: &str) {
    if let Some(inner) = backend.upgrade() {
        inner.reserved.free(name);
    }
}
