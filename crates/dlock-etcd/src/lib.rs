//! etcd backend for [dlock](dlock_core): a fair (FIFO) mutex ordered by
//! create revision, on session leases kept alive in the background, with
//! the waiter key's create revision as fencing token.
//!
//! ```no_run
//! use std::time::Duration;
//! use dlock_etcd::{EtcdBackend, Locker};
//!
//! # async fn demo() -> Result<(), dlock_etcd::LockError> {
//! let backend = EtcdBackend::connect(["http://127.0.0.1:2379"]).await?;
//! let locker = Locker::new(backend);
//! let guard = locker.lock("orders/42").ttl(Duration::from_secs(10)).await?;
//! let token = guard.fencing_token(); // the key's create revision
//! # let _ = token;
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! How it works: each acquisition writes its own waiter key
//! `{prefix}{len}/{key}/{client}-{slot}` under the session's lease (with
//! its owner token as value; see `names.rs` for why names are reused), in a
//! transaction that also reads the oldest waiter key of the lock. The
//! oldest one holds the lock; the others watch only their immediate
//! predecessor's deletion. Locks with auto-renewal share one lease per TTL
//! (in whole seconds, the unit etcd leases use); `auto_renew(false)` gets
//! a lease of its own that runs out.
//!
//! # Building
//!
//! etcd-client compiles etcd's protocol files at build time, which needs
//! the Protocol Buffers compiler and its well-known types. On Debian or
//! Ubuntu: `sudo apt-get install protobuf-compiler libprotobuf-dev`
//! (elsewhere, install `protoc` or point the `PROTOC` variable at it).

#![forbid(unsafe_code)]

mod builder;
mod cleanup;
mod election;
mod errors;
mod members;
mod mutex;
mod names;
mod rwlock;
mod semaphore;
mod session;
mod txn;
mod watches;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dlock_core::backend::{
    AcquireRequest, Attempt, Capabilities, ExtendOutcome, LeaderState, Lease, LockBackend, OwnerToken,
    ProclaimOutcome, ReleaseEvents, ReleaseOutcome, async_trait,
};
pub use dlock_core::user_api::*;
pub use etcd_client;
use etcd_client::{Client, Compare, CompareOp, KeyValue, Txn, TxnOp};
use tokio::time::Instant;

pub use crate::builder::EtcdBackendBuilder;
use crate::errors::from_etcd;
use crate::members::{Failure, Members};
use crate::names::{Reserved, WaiterName, kind_of_name, name_client};
use crate::session::Session;
use crate::txn::{held_by_other, oldest_waiter, transact, whole_queue};
use crate::watches::{Deletion, Watches};

/// A lock backend on an etcd cluster. Cheap to clone; clones share the
/// connection, the sessions and the watch stream.
///
/// Connect on the Tokio runtime that will use it: the connections (from
/// etcd-client) and the task that owns the watch stream run on the runtime
/// that called [`connect`](EtcdBackendBuilder::connect), and stop with it.
#[derive(Clone)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    members: Arc<Members>,
    prefix: String,
    request_timeout: Duration,
    endpoints: String,
    /// Live sessions by TTL in whole seconds.
    sessions: tokio::sync::Mutex<HashMap<i64, Arc<Session>>>,
    /// Names this backend's waiter keys get: `{client_id}-{slot}`.
    client_id: String,
    /// The names in use (see `names.rs`).
    reserved: Reserved,
    /// The deletion watches (loss signals, predecessors) on one stream.
    watches: Watches,
    /// Waiter keys of requests that have not acquired yet, by owner.
    waiting: Mutex<HashMap<String, WaiterName>>,
}

/// The lease a held lock's key lives on.
#[derive(Clone)]
enum Binding {
    /// A shared, kept-alive session (auto-renewed locks).
    Session(Arc<Session>),
    /// A lease of its own that simply runs out (`auto_renew(false)`).
    Own { id: i64, ttl: Duration },
}

/// What a held lock keeps for release and renewal.
struct Held {
    binding: Mutex<Binding>,
    /// The lock's waiter key.
    name: WaiterName,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Unless released (or a failed release started deleting the key),
        // the lock was forgotten or lost: its key stays until its lease
        // runs out, as if this process had died. A kept-alive session's
        // lease would not run out, so the key moves to one that does.
        let expire_in = match self.binding() {
            Binding::Session(session) => Some(session.seconds),
            Binding::Own { .. } => None,
        };
        self.name.keep_until_gone(expire_in);
    }
}

impl Held {
    fn binding(&self) -> Binding {
        self.binding
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn rebind(&self, binding: Binding) {
        *self.binding.lock().unwrap_or_else(PoisonError::into_inner) = binding;
    }
}

/// Whole seconds for a TTL, rounded up (etcd leases count in seconds).
fn whole_seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
        .unwrap_or(i64::MAX)
        .max(1)
}

impl EtcdBackend {
    /// Default prefix of every key dlock writes.
    pub const DEFAULT_KEY_PREFIX: &str = "/dlock/";
    /// Default limit for one request's round trip.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
    /// Default limit for connecting (and the first request, which needs a leader).
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// The prefix under which `key`'s waiter keys live. The key's length
    /// comes first, so that no lock's prefix contains another's.
    pub fn queue_prefix(&self, key: &str) -> String {
        format!("{}{}/{key}/", self.inner.prefix, key.len())
    }

    /// `owner`'s waiter key name for `key` and its create revision once
    /// known; a name is reserved on the first call.
    fn queue_entry(&self, key: &str, owner: &OwnerToken, kind: LockKind) -> (String, Option<i64>) {
        let mut waiting = self.inner.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = waiting.get(owner.as_str()) {
            return (entry.as_str().to_owned(), entry.revision);
        }
        let name = self
            .inner
            .reserved
            .take(&self.queue_prefix(key), &name_client(kind, &self.inner.client_id));
        let entry = WaiterName::new(key, name.clone(), Arc::downgrade(&self.inner));
        waiting.insert(owner.as_str().to_owned(), entry);
        (name, None)
    }

    /// Changes `owner`'s waiter entry, if it still has one.
    fn update_entry(&self, owner: &OwnerToken, change: impl FnOnce(&mut WaiterName)) {
        if let Some(entry) = self
            .inner
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(owner.as_str())
        {
            change(entry);
        }
    }

    /// Runs one request, failing over between members, within the request
    /// timeout. `request` may run more than once (on another member): every
    /// write dlock sends is guarded by a compare on the key, so a repeat
    /// cannot take or free a lock twice.
    async fn call<T, F, Fut>(&self, key: &str, doing: &str, request: F) -> Result<T, LockError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        match self.inner.members.call(self.inner.request_timeout, request).await {
            Ok(value) => Ok(value),
            Err(Failure::Refused(error)) | Err(Failure::NoAnswer(Some(error))) => {
                Err(from_etcd(Some(key), doing, error))
            }
            Err(Failure::NoAnswer(None)) => Err(LockError::unavailable(
                Some(key),
                format!(
                    "{doing}: no etcd member at {} answered within {:?} (down, or no quorum?)",
                    self.inner.endpoints, self.inner.request_timeout
                ),
            )),
        }
    }

    /// The live session for `ttl`, started if there is none.
    async fn session(&self, key: &str, ttl: Duration) -> Result<Arc<Session>, LockError> {
        let seconds = whole_seconds(ttl);
        let mut sessions = self.inner.sessions.lock().await;
        if let Some(session) = sessions.get(&seconds).filter(|session| !session.state().lost) {
            return Ok(Arc::clone(session));
        }
        let session = self
            .call(key, "starting a session lease", |client| {
                Session::start(client, Arc::clone(&self.inner.members), seconds)
            })
            .await?;
        sessions.insert(seconds, Arc::clone(&session));
        Ok(session)
    }

    /// `owner`'s waiter key is gone (its lease ended, or it was deleted):
    /// the error for the attempt, after forgetting the key.
    fn waiter_key_gone(&self, key: &str, owner: &OwnerToken) -> LockError {
        if let Some(gone) = self.take_waiting(owner) {
            gone.mark_gone();
        }
        LockError::unavailable(
            Some(key),
            "the waiter key disappeared while waiting (its lease expired or it was deleted); \
             the request will queue again if its wait allows",
        )
    }

    fn take_waiting(&self, owner: &OwnerToken) -> Option<WaiterName> {
        self.inner
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(owner.as_str())
    }

    /// Resolves when `waiter_key` is deleted after `after_revision`.
    fn watch_deletion(&self, waiter_key: String, after_revision: i64) -> Deletion {
        self.inner.watches.deletion(waiter_key, after_revision)
    }
}

#[async_trait]
impl LockBackend for EtcdBackend {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt, LockError> {
        // A mutex and an election's candidate queue alike: the oldest key
        // holds the lock, or leads (etcd's own elections do the same).
        let kind = request.kind;
        match kind {
            LockKind::Exclusive | LockKind::Election => {}
            LockKind::Semaphore { permits } => return self.try_acquire_permit(request, permits).await,
            LockKind::Shared => return self.try_acquire_shared(request).await,
            other => return Err(LockError::unsupported(Some(request.key), other.to_string())),
        }
        let started = Instant::now();
        let (key, owner) = (request.key, request.owner);
        // The entry stays in `waiting` until the request acquires or leaves
        // the queue, so that a retry finds its key and `abandon` deletes it.
        let (waiter, known) = self.queue_entry(key, owner, kind);
        // Waiters queue on the kept-alive session for their TTL, so that a
        // long wait never outlives the waiter key.
        let session = self.session(key, request.ttl).await?;
        let place = self
            .stand_in_queue(request, &waiter, known, &session, oldest_waiter())
            .await?;
        if place.is_first {
            return self.grant(request, waiter, place, session, started).await;
        }
        // Busy: a semaphore's permits at the head are refused, not waited for.
        self.refuse_other_kinds(key, kind, &place.ahead, (owner, &waiter, place.revision))
            .await?;
        if !request.queue {
            return self.leave_at_once(key, owner, &waiter, place.revision).await;
        }
        self.watch_predecessor(key, place.revision, request.ttl, false, None)
            .await
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<ExtendOutcome, LockError> {
        let key = lease.key();
        let started = Instant::now();
        let revision = i64::try_from(lease.token().get()).unwrap_or(i64::MAX);
        let Some(held) = lease.handle::<Held>() else {
            return Ok(ExtendOutcome::NotHeld(NotHeldReason::Expired));
        };
        let waiter = held.name.as_str();
        let seconds = whole_seconds(ttl);
        let (binding, valid_until) = match held.binding() {
            Binding::Session(session) if session.seconds == seconds && !session.state().lost => {
                // The session keeps the lease alive; check that the key is
                // still ours, on that lease.
                if let Some(reason) = self
                    .check_ours(key, waiter, revision, Some(session.lease))
                    .await?
                {
                    return Ok(ExtendOutcome::NotHeld(reason));
                }
                let valid_until = session.state().valid_until;
                (Binding::Session(session), valid_until)
            }
            Binding::Session(_) => {
                // Another TTL: move the key onto that TTL's session.
                let session = self.session(key, ttl).await?;
                if !self.rebind_key(key, waiter, revision, session.lease).await? {
                    return Ok(ExtendOutcome::NotHeld(self.why_not_held(key).await?));
                }
                let valid_until = session.state().valid_until;
                (Binding::Session(session), valid_until)
            }
            Binding::Own { id, ttl: lease_ttl } if whole_seconds(lease_ttl) >= seconds => {
                let sent = Instant::now();
                let renewed = self
                    .call(key, "renewing the lease", |mut client| async move {
                        let (mut keeper, mut responses) = client.lease_keep_alive(id).await?;
                        keeper.keep_alive().await?;
                        responses.message().await
                    })
                    .await?;
                if renewed.is_none_or(|response| response.ttl() <= 0) {
                    return Ok(ExtendOutcome::NotHeld(self.why_not_held(key).await?));
                }
                if let Some(reason) = self.check_ours(key, waiter, revision, Some(id)).await? {
                    return Ok(ExtendOutcome::NotHeld(reason));
                }
                (Binding::Own { id, ttl: lease_ttl }, sent + lease_ttl)
            }
            Binding::Own { id: old, .. } => {
                // A longer TTL than the lease has: move the key onto a new lease.
                let sent = Instant::now();
                let (id, lease_ttl) = self.own_lease(key, ttl).await?;
                if !self.rebind_key(key, waiter, revision, id).await? {
                    self.revoke_later(id);
                    return Ok(ExtendOutcome::NotHeld(self.why_not_held(key).await?));
                }
                self.revoke_later(old);
                (Binding::Own { id, ttl: lease_ttl }, sent + lease_ttl)
            }
        };
        held.rebind(binding);
        Ok(ExtendOutcome::Extended {
            validity: valid_until
                .saturating_duration_since(started)
                .saturating_sub(drift_allowance(ttl)),
        })
    }

    async fn release(&self, lease: &Lease) -> Result<ReleaseOutcome, LockError> {
        let key = lease.key();
        let Some(held) = lease.handle::<Held>() else {
            return Ok(ReleaseOutcome::NotHeld(NotHeldReason::Expired));
        };
        let waiter = held.name.as_str();
        let revision = i64::try_from(lease.token().get()).unwrap_or(i64::MAX);
        let txn = Txn::new()
            .when([Compare::create_revision(waiter, CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(waiter, None)])
            .or_else([TxnOp::get(self.queue_prefix(key), Some(oldest_waiter()))]);
        let response = match self.call(key, "releasing", |client| transact(client, &txn)).await {
            Ok(response) => response,
            Err(error) => {
                held.name.delete_later();
                return Err(error);
            }
        };
        // Deleted now, or already gone: either way no key of ours is left.
        held.name.mark_gone();
        if let Binding::Own { id, .. } = held.binding() {
            self.revoke_later(id);
        }
        if response.succeeded() {
            return Ok(ReleaseOutcome::Released);
        }
        Ok(ReleaseOutcome::NotHeld(held_by_other(&response.op_responses())))
    }

    async fn abandon(&self, key: &str, owner: &OwnerToken) -> Result<(), LockError> {
        // No entry: the request never wrote, or already cleaned up.
        let Some(entry) = self.take_waiting(owner) else {
            return Ok(());
        };
        let outcome = self
            .leave_queue(key, entry.as_str(), entry.revision, entry.lease)
            .await;
        match outcome {
            Ok(true) => entry.retire(),
            Ok(false) => entry.mark_gone(),
            Err(_) => {}
        }
        // Dropping the entry frees its name, or first deletes its key in the background.
        outcome.map(drop)
    }

    async fn proclaim(&self, lease: &Lease, value: &str) -> Result<ProclaimOutcome, LockError> {
        self.proclaim_value(lease, value).await
    }

    async fn leader(&self, key: &str) -> Result<Option<LeaderState>, LockError> {
        self.read_leader(key).await
    }

    /// Waiters get a watch on their own predecessor with every Busy; this
    /// serves election observers (and a waiter whose predecessor left
    /// between two reads): any change under the key's queue prefix.
    async fn subscribe(&self, key: &str) -> Result<ReleaseEvents, LockError> {
        self.watch_queue(key).await
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default().with_fifo_fairness()
    }

    /// For operators: whether `key` is held, for how long its holder's
    /// lease still runs, the holder's fencing token, and how many wait.
    async fn inspect(&self, key: &str) -> Result<KeyStatus, LockError> {
        let found = self.read_queue(key, "inspecting", whole_queue()).await?;
        let holders = self.holders(key, found.kvs());
        let Some(holder) = holders.last() else {
            return Ok(KeyStatus::free().waiting(0));
        };
        // The youngest holder's lease: until then the key stays in use.
        let (token, lease) = (holder.create_revision(), holder.lease());
        let remaining = self
            .call(key, "reading the holder's lease", |mut client| async move {
                client.lease_time_to_live(lease, None).await
            })
            .await?
            .ttl();
        let kind = kind_of_name(&self.queue_prefix(key), &String::from_utf8_lossy(holder.key()));
        let mut status = KeyStatus::held()
            .kind(kind)
            .holders(holders.len())
            .waiting(found.kvs().len() - holders.len());
        if let Ok(left) = u64::try_from(remaining) {
            status = status.remaining(Duration::from_secs(left));
        }
        if let Ok(token) = u64::try_from(token) {
            status = status.last_token(token);
        }
        Ok(status)
    }

    /// For operators, and unsafe: deletes the holders' keys, whoever they
    /// are (a mutex's holder, every reader, every permit); the next waiters
    /// get the key. The holders learn it at once (their watches see the
    /// deletion) but may still be writing; only fencing tokens protect the
    /// resource from them. Returns whether the key was held.
    async fn force_release(&self, key: &str) -> Result<bool, LockError> {
        let found = self.read_queue(key, "finding the holders", whole_queue()).await?;
        let holders = self.holders(key, found.kvs());
        if holders.is_empty() {
            return Ok(false);
        }
        // Each key as it was read: a name reused since is someone else's.
        let delete = Txn::new()
            .when(
                holders
                    .iter()
                    .map(|holder| {
                        Compare::create_revision(holder.key(), CompareOp::Equal, holder.create_revision())
                    })
                    .collect::<Vec<_>>(),
            )
            .and_then(
                holders
                    .iter()
                    .map(|holder| TxnOp::delete(holder.key(), None))
                    .collect::<Vec<_>>(),
            );
        let response = self
            .call(key, "force-releasing", |client| transact(client, &delete))
            .await?;
        Ok(response.succeeded())
    }
}

impl EtcdBackend {
    /// The keys of a queue listing (oldest first) that hold the lock: the
    /// oldest, and for readers and permits the ones that hold beside it.
    fn holders<'a>(&self, key: &str, queue: &'a [KeyValue]) -> &'a [KeyValue] {
        let prefix = self.queue_prefix(key);
        let kind_of = |kv: &KeyValue| kind_of_name(&prefix, &String::from_utf8_lossy(kv.key()));
        let held = match queue.first().map(kind_of) {
            None => 0,
            Some(LockKind::Shared) => queue
                .iter()
                .take_while(|kv| kind_of(kv) == LockKind::Shared)
                .count(),
            Some(LockKind::Semaphore { permits }) => queue.len().min(permits as usize),
            Some(_) => 1,
        };
        &queue[..held]
    }
}

impl fmt::Debug for EtcdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackend")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}
