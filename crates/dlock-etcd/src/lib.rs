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

mod errors;
mod members;
mod names;
mod session;
mod watches;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use dlock_core::backend::{
    AcquireRequest, Attempt, Busy, Capabilities, ExtendOutcome, Grant, HostListUrl, Lease, LockBackend,
    OwnerToken, ReleaseEvents, ReleaseOutcome, async_trait, redact_url, validate_timeout,
};
pub use dlock_core::user_api::*;
pub use etcd_client;
#[cfg(feature = "tls")]
use etcd_client::{Certificate, TlsOptions};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tracing::debug;

use crate::errors::from_etcd;
use crate::members::{Failure, Members};
use crate::names::{Reserved, WaiterName};
use crate::session::Session;
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
    owner: OwnerToken,
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
        self.name.keep_until_gone(&self.owner, expire_in);
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

/// Settings for [`EtcdBackend`]; start with [`EtcdBackend::builder`].
#[derive(Clone)]
pub struct EtcdBackendBuilder {
    endpoints: Vec<String>,
    /// Why an `etcd://` URL could not be read, reported by `connect`.
    invalid: Option<String>,
    key_prefix: String,
    request_timeout: Duration,
    connect_timeout: Duration,
    user: Option<(String, String)>,
    root_certificates: Option<Vec<u8>>,
}

impl EtcdBackend {
    /// Default prefix of every key dlock writes.
    pub const DEFAULT_KEY_PREFIX: &str = "/dlock/";
    /// Default limit for one request's round trip.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
    /// Default limit for connecting (and the first request, which needs a leader).
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to the cluster with default settings. `endpoints` is either
    /// the members' endpoints (`http://host:port`, `https://host:port` with
    /// the `tls` feature, or `host:port`), or a single URL naming them all:
    /// `etcd://[user:password@]h1:2379,h2:2379` (`etcd+https://` for TLS),
    /// whose user and password are used as with
    /// [`EtcdBackendBuilder::user`].
    pub async fn connect<I, S>(endpoints: I) -> Result<Self, LockError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::builder(endpoints).connect().await
    }

    /// Settings for a connection to `endpoints`.
    pub fn builder<I, S>(endpoints: I) -> EtcdBackendBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let endpoints: Vec<String> = endpoints
            .into_iter()
            .map(|endpoint| endpoint.as_ref().to_owned())
            .collect();
        let mut builder = EtcdBackendBuilder {
            endpoints,
            invalid: None,
            key_prefix: Self::DEFAULT_KEY_PREFIX.to_owned(),
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            user: None,
            root_certificates: None,
        };
        let single_url = match builder.endpoints.as_slice() {
            [single] if single.starts_with("etcd://") || single.starts_with("etcd+") => Some(single.clone()),
            _ => None,
        };
        if let Some(url) = single_url {
            match HostListUrl::parse(&url) {
                Ok(parsed) if matches!(parsed.scheme.as_str(), "etcd" | "etcd+http" | "etcd+https") => {
                    let scheme = if parsed.scheme == "etcd+https" {
                        "https"
                    } else {
                        "http"
                    };
                    builder.endpoints = parsed
                        .hosts
                        .iter()
                        .map(|host| format!("{scheme}://{host}"))
                        .collect();
                    if let Some(password) = &parsed.password {
                        builder.user = Some((parsed.user.clone().unwrap_or_default(), password.clone()));
                    }
                }
                Ok(parsed) => builder.invalid = Some(format!("unknown scheme {:?}", parsed.scheme)),
                Err(reason) => builder.invalid = Some(reason),
            }
        }
        builder
    }

    /// The prefix under which `key`'s waiter keys live. The key's length
    /// comes first, so that no lock's prefix contains another's.
    pub fn queue_prefix(&self, key: &str) -> String {
        format!("{}{}/{key}/", self.inner.prefix, key.len())
    }

    /// `owner`'s waiter key name for `key` and its create revision once
    /// known; a name is reserved on the first call.
    fn queue_entry(&self, key: &str, owner: &OwnerToken) -> (String, Option<i64>) {
        let mut waiting = self.inner.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = waiting.get(owner.as_str()) {
            return (entry.as_str().to_owned(), entry.revision);
        }
        let name = self
            .inner
            .reserved
            .take(&self.queue_prefix(key), &self.inner.client_id);
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

    /// The key that, once written, makes a late write of the waiter key
    /// `waiter` fail (see [`leave_queue`](Self::leave_queue)). Outside
    /// every queue: queue prefixes start with a digit.
    fn abandoned_marker(&self, waiter: &str) -> String {
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
    async fn leave_queue(
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

    /// A lease of its own for a lock without renewal: its id and TTL.
    async fn own_lease(&self, key: &str, ttl: Duration) -> Result<(i64, Duration), LockError> {
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
    async fn rebind_key(
        &self,
        key: &str,
        waiter: &str,
        owner: &OwnerToken,
        revision: i64,
        lease: i64,
    ) -> Result<bool, LockError> {
        let txn = Txn::new()
            .when([Compare::create_revision(waiter, CompareOp::Equal, revision)])
            .and_then([TxnOp::put(
                waiter,
                owner.as_str(),
                Some(PutOptions::new().with_lease(lease)),
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
    async fn check_ours(
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
    async fn why_not_held(&self, key: &str) -> Result<NotHeldReason, LockError> {
        let found = self
            .call(key, "reading the queue", |mut client| {
                let queue = self.queue_prefix(key);
                async move { client.get(queue, Some(oldest_waiter())).await }
            })
            .await?;
        Ok(if found.kvs().is_empty() {
            NotHeldReason::Expired
        } else {
            NotHeldReason::OtherOwner
        })
    }

    /// Keeps trying to delete a waiter key that a failed release or
    /// clean-up left behind. It matters here more than with Redis: on a
    /// kept-alive session the key would otherwise block the queue for as
    /// long as the session lives. Stops when the key is gone, or with the
    /// backend (whose sessions then end, and their keys with them). Frees
    /// the name once the key is gone.
    fn delete_in_background(&self, key: &str, waiter: String, revision: Option<i64>, lease: Option<i64>) {
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
    fn free_when_gone(
        &self,
        key: &str,
        waiter: String,
        revision: i64,
        owner: OwnerToken,
        expire_in: Option<i64>,
    ) {
        let backend = Arc::downgrade(&self.inner);
        let key = key.to_owned();
        let first_pause = Duration::from_millis(100);
        tokio::spawn(async move {
            let (key, waiter, owner) = (&key, &waiter, &owner);
            if let Some(seconds) = expire_in {
                let ttl = Duration::from_secs(u64::try_from(seconds).unwrap_or(1));
                let moved = retry_until(&backend, first_pause, |backend| async move {
                    let (lease, _) = backend.own_lease(key, ttl).await.ok()?;
                    let rebound = backend.rebind_key(key, waiter, owner, revision, lease).await;
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
    fn revoke_later(&self, id: i64) {
        let members = Arc::clone(&self.inner.members);
        tokio::spawn(async move {
            let _ = members
                .call(Duration::from_secs(2), |mut client| async move {
                    client.lease_revoke(id).await
                })
                .await;
        });
    }

    /// Resolves when `waiter_key` is deleted after `after_revision`.
    fn watch_deletion(&self, waiter_key: String, after_revision: i64) -> Deletion {
        self.inner.watches.deletion(waiter_key, after_revision)
    }
}

impl EtcdBackendBuilder {
    /// Prefix of every key dlock writes (default `/dlock/`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Limit for one request (default 3 s); a request that takes longer
    /// fails with [`LockError::Unavailable`].
    pub fn request_timeout(mut self, limit: Duration) -> Self {
        self.request_timeout = limit;
        self
    }

    /// Limit for connecting, including a first read that needs a leader
    /// (default 5 s).
    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// User and password for an etcd with auth enabled (default: none).
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.user = Some((name.to_owned(), password.to_owned()));
        self
    }

    /// Certificates (PEM) of the authorities to trust for `https://`
    /// endpoints, instead of the system's trust store (the default). With
    /// the `tls` feature.
    #[cfg(feature = "tls")]
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificates = Some(pem.into());
        self
    }

    /// The options for `https://` endpoints.
    #[cfg(feature = "tls")]
    fn with_tls(&self, options: ConnectOptions) -> Result<ConnectOptions, LockError> {
        let tls = match &self.root_certificates {
            Some(pem) => TlsOptions::new().ca_certificate(Certificate::from_pem(pem)),
            None => TlsOptions::new().with_native_roots(),
        };
        Ok(options.with_tls(tls))
    }

    #[cfg(not(feature = "tls"))]
    fn with_tls(&self, _options: ConnectOptions) -> Result<ConnectOptions, LockError> {
        Err(LockError::invalid_options(
            None,
            "https:// endpoints need the `tls` feature of dlock-etcd (on by default)",
        ))
    }

    /// Connects and checks that the cluster answers with a leader. Fails
    /// with [`LockError::InvalidOptions`] for malformed endpoints or
    /// settings, and [`LockError::Unavailable`] when no member answers
    /// within the connect timeout.
    pub async fn connect(self) -> Result<EtcdBackend, LockError> {
        let invalid = |reason: String| LockError::invalid_options(None, reason);
        if let Some(reason) = &self.invalid {
            return Err(invalid(format!(
                "{reason}; expected etcd://[user:password@]host:port,host:port or http://host:port endpoints"
            )));
        }
        if self.endpoints.is_empty() {
            return Err(invalid(
                "no etcd endpoints given; pass http://host:2379 or host:2379".into(),
            ));
        }
        for endpoint in &self.endpoints {
            check_endpoint(endpoint).map_err(|problem| {
                invalid(format!(
                    "{:?} is not an etcd endpoint ({problem}); expected http://host:port or host:port",
                    redact_url(endpoint)
                ))
            })?;
        }
        let longest = Duration::from_secs(300);
        validate_timeout("request timeout", self.request_timeout, longest)?;
        validate_timeout("connect timeout", self.connect_timeout, longest)?;
        let endpoints = self.endpoints.join(", ");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_timeout(self.request_timeout)
            .with_require_leader(true)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            // etcd's auth tokens expire when idle; a long-lived backend must renew them.
            .with_auto_token_refresh(true);
        if let Some((name, password)) = &self.user {
            options = options.with_user(name.clone(), password.clone());
        }
        if self
            .endpoints
            .iter()
            .any(|endpoint| endpoint.starts_with("https://"))
        {
            options = self.with_tls(options)?;
        }
        let connecting = format!("connecting to etcd at {endpoints}");
        // One client per member (see `members.rs`). Without auth they
        // connect lazily; with auth, a member that is down now is left out.
        let mut clients = Vec::new();
        let mut last_error = None;
        for endpoint in &self.endpoints {
            match timeout(
                self.connect_timeout,
                Client::connect([endpoint], Some(options.clone())),
            )
            .await
            {
                Ok(Ok(client)) => clients.push(client),
                Ok(Err(error)) => last_error = Some(error),
                Err(_) => {}
            }
        }
        if clients.is_empty() {
            return Err(match last_error {
                Some(error) => from_etcd(None, &connecting, error),
                None => LockError::unavailable(
                    None,
                    format!(
                        "{connecting}: no member answered within {:?}",
                        self.connect_timeout
                    ),
                ),
            });
        }
        let members = Arc::new(Members::new(clients));
        // At most a second: this only saves a hop per request.
        members
            .prefer_leader(self.connect_timeout.min(Duration::from_secs(1)))
            .await;
        // A linearizable read: answers only with a leader and quorum.
        let probe = members
            .call(self.connect_timeout, |mut client| {
                let prefix = self.key_prefix.clone();
                async move {
                    client
                        .get(prefix, Some(GetOptions::new().with_count_only()))
                        .await
                }
            })
            .await;
        match probe {
            Ok(_) => {}
            Err(Failure::Refused(error)) | Err(Failure::NoAnswer(Some(error))) => {
                return Err(from_etcd(None, &connecting, error));
            }
            Err(Failure::NoAnswer(None)) => {
                return Err(LockError::unavailable(
                    None,
                    format!(
                        "{connecting}: no answer with a leader within {:?}",
                        self.connect_timeout
                    ),
                ));
            }
        }
        let watches = Watches::start(Arc::clone(&members));
        Ok(EtcdBackend {
            inner: Arc::new(Inner {
                members,
                watches,
                prefix: self.key_prefix,
                request_timeout: self.request_timeout,
                endpoints,
                sessions: tokio::sync::Mutex::new(HashMap::new()),
                client_id: OwnerToken::generate()?.as_str().to_owned(),
                reserved: Reserved::default(),
                waiting: Mutex::new(HashMap::new()),
            }),
        })
    }
}

/// Runs `step` until it gives `Some`, pausing between tries (from
/// `first_pause`, doubling up to 5 s); `None` once the backend is gone.
async fn retry_until<T, Fut>(
    backend: &Weak<Inner>,
    first_pause: Duration,
    mut step: impl FnMut(EtcdBackend) -> Fut,
) -> Option<T>
where
    Fut: Future<Output = Option<T>>,
{
    let mut pause = first_pause;
    loop {
        let current = EtcdBackend {
            inner: backend.upgrade()?,
        };
        // Each try gets the backend for itself, so that it is not kept
        // alive while waiting.
        if let Some(done) = step(current).await {
            return Some(done);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Frees a waiter key name, if the backend is still there.
fn free_name(backend: &Weak<Inner>, name: &str) {
    if let Some(inner) = backend.upgrade() {
        inner.reserved.free(name);
    }
}

/// `http://host:port`, `https://host:port` or `host:port`.
fn check_endpoint(endpoint: &str) -> Result<(), &'static str> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    if rest.contains("://") {
        return Err("unknown scheme");
    }
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or("no port")?;
    if host.is_empty() || host.contains(['/', ' ']) {
        return Err("bad host");
    }
    port.parse::<u16>().map(drop).map_err(|_| "bad port")
}

/// A Get of the oldest waiter key under a queue prefix (the holder).
fn oldest_waiter() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
        .with_limit(1)
        .with_keys_only()
}

/// From a failed owner check's Get of the queue head: someone else holds
/// the lock, or nobody does.
fn held_by_other(responses: &[TxnOpResponse]) -> NotHeldReason {
    if first_kv(responses, 0).is_some() {
        NotHeldReason::OtherOwner
    } else {
        NotHeldReason::Expired
    }
}

/// Sends a transaction (a copy, so that a retry on another member can send it again).
async fn transact(mut client: Client, txn: &Txn) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
    client.txn(txn.clone()).await
}

/// The first kv of a Get inside a transaction's responses.
fn first_kv(responses: &[TxnOpResponse], index: usize) -> Option<&KeyValue> {
    match responses.get(index) {
        Some(TxnOpResponse::Get(get)) => get.kvs().first(),
        _ => None,
    }
}

#[async_trait]
impl LockBackend for EtcdBackend {
    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt, LockError> {
        request.require_exclusive()?;
        let (key, owner, ttl) = (request.key, request.owner, request.ttl);
        let started = Instant::now();
        // The entry stays in `waiting` until the request acquires or leaves
        // the queue, so that a retry finds its key and `abandon` deletes it.
        let (waiter, known) = self.queue_entry(key, owner);
        let oldest = oldest_waiter();
        let queue = self.queue_prefix(key);

        // Waiters queue on the kept-alive session for their TTL, so that a
        // long wait never outlives the waiter key.
        let session = self.session(key, ttl).await?;
        let lease = session.lease;
        if known.is_none() {
            self.update_entry(owner, |entry| entry.lease = Some(lease));
        }
        let txn = match known {
            // First attempt: queue up, and read the oldest waiter. The
            // marker's absence: a write that arrives after the request gave
            // up under an unknown outcome changes nothing (see `leave_queue`).
            None => Txn::new()
                .when([
                    Compare::create_revision(waiter.as_str(), CompareOp::Equal, 0),
                    Compare::create_revision(self.abandoned_marker(&waiter), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(
                        waiter.as_str(),
                        owner.as_str(),
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    TxnOp::get(queue.as_str(), Some(oldest.clone())),
                ])
                .or_else([
                    TxnOp::get(waiter.as_str(), None),
                    TxnOp::get(queue.as_str(), Some(oldest)),
                ]),
            // After a wait: our key must still be the one we wrote, on the
            // lease whose validity a grant would report.
            Some(revision) => Txn::new()
                .when([
                    Compare::create_revision(waiter.as_str(), CompareOp::Equal, revision),
                    Compare::lease(waiter.as_str(), CompareOp::Equal, lease),
                ])
                .and_then([TxnOp::get(queue.as_str(), Some(oldest.clone()))])
                .or_else([
                    TxnOp::get(waiter.as_str(), None),
                    TxnOp::get(queue.as_str(), Some(oldest)),
                ]),
        };
        let response = self
            .call(key, "queueing", |client| transact(client, &txn))
            .await?;
        let header_revision = response.header().map_or(0, |header| header.revision());
        let responses = response.op_responses();
        // The lease our key is on, when it is not the session's.
        let mut on_lease = lease;
        let (my_revision, first) = match (known, response.succeeded()) {
            (None, true) => (header_revision, first_kv(&responses, 1)),
            // The name is taken: by this request's own write, which a
            // retried attempt finds, or by a write of an earlier request
            // that reached the cluster after that request had given up.
            (None, false) => match first_kv(&responses, 0) {
                Some(mine) if mine.value() == owner.as_str().as_bytes() => {
                    on_lease = mine.lease();
                    (mine.create_revision(), first_kv(&responses, 1))
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
            (Some(revision), true) => (revision, first_kv(&responses, 0)),
            (Some(revision), false) => match first_kv(&responses, 0) {
                // Ours, on an older session's lease (that session was given
                // up): moved onto the current one below.
                Some(mine) if mine.create_revision() == revision => {
                    on_lease = mine.lease();
                    (revision, first_kv(&responses, 1))
                }
                // Our key expired (its lease ended) or was deleted while we
                // waited: never report success on a key that is gone.
                _ => return Err(self.waiter_key_gone(key, owner)),
            },
        };
        self.update_entry(owner, |entry| entry.revision = Some(my_revision));
        if on_lease != lease && !self.rebind_key(key, &waiter, owner, my_revision, lease).await? {
            return Err(self.waiter_key_gone(key, owner));
        }

        let is_first = first
            .is_some_and(|head| head.key() == waiter.as_bytes() && head.create_revision() == my_revision);
        if is_first {
            let token = FencingToken::new(u64::try_from(my_revision).unwrap_or(0));
            let (binding, valid_until) = if request.auto_renew {
                let valid_until = session.state().valid_until;
                (Binding::Session(session), valid_until)
            } else {
                // A lease of its own that runs out: move the key onto it
                // (same key, same create revision, so the same token).
                let sent = Instant::now();
                let (id, lease_ttl) = self.own_lease(key, ttl).await?;
                match self.rebind_key(key, &waiter, owner, my_revision, id).await {
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
                owner: owner.clone(),
            };
            let signal = self.watch_deletion(waiter, header_revision.max(my_revision));
            return Ok(Attempt::Acquired(
                Grant::new(token, validity)
                    .with_handle(held)
                    .with_loss_signal(signal),
            ));
        }

        if !request.queue {
            // try_lock: leave the queue at once.
            let delete = Txn::new()
                .when([Compare::create_revision(
                    waiter.as_str(),
                    CompareOp::Equal,
                    my_revision,
                )])
                .and_then([TxnOp::delete(waiter.as_str(), None)]);
            self.call(key, "leaving the queue", |client| transact(client, &delete))
                .await?;
            if let Some(left) = self.take_waiting(owner) {
                left.mark_gone();
            }
            return Ok(Attempt::Busy(Busy::new()));
        }

        // Watch only the immediate predecessor.
        let predecessor = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Descend)
            .with_max_create_revision(my_revision - 1)
            .with_limit(1)
            .with_keys_only();
        let found = self
            .call(key, "finding the predecessor", |mut client| {
                let (queue, predecessor) = (queue.clone(), predecessor.clone());
                async move { client.get(queue, Some(predecessor)).await }
            })
            .await?;
        let Some(before) = found.kvs().first() else {
            // It left between our two reads: look again at once.
            return Ok(Attempt::Busy(Busy::new().retry_after(Duration::ZERO)));
        };
        let watched = String::from_utf8_lossy(before.key()).into_owned();
        let seen = found.header().map_or(my_revision, |header| header.revision());
        let (sender, receiver) = mpsc::channel(1);
        let deleted = self.watch_deletion(watched, seen);
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

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<ExtendOutcome, LockError> {
        let key = lease.key();
        let started = Instant::now();
        let revision = i64::try_from(lease.token().get()).unwrap_or(i64::MAX);
        let Some(held) = lease.handle::<Held>() else {
            return Ok(ExtendOutcome::NotHeld(NotHeldReason::Expired));
        };
        let waiter = held.name.as_str();
        let owner = lease.owner();
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
                if !self
                    .rebind_key(key, waiter, owner, revision, session.lease)
                    .await?
                {
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
                if !self.rebind_key(key, waiter, owner, revision, id).await? {
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

    async fn subscribe(&self, _key: &str) -> Result<ReleaseEvents, LockError> {
        // Waiters get a watch on their own predecessor with every Busy.
        Ok(ReleaseEvents::never())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default().with_fifo_fairness()
    }

    /// For operators: whether `key` is held, for how long its holder's
    /// lease still runs, the holder's fencing token, and how many wait.
    async fn inspect(&self, key: &str) -> Result<KeyStatus, LockError> {
        let queue = self.queue_prefix(key);
        let listing = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend)
            .with_keys_only();
        let found = self
            .call(key, "inspecting", |mut client| {
                let (queue, listing) = (queue.clone(), listing.clone());
                async move { client.get(queue, Some(listing)).await }
            })
            .await?;
        let Some(holder) = found.kvs().first() else {
            return Ok(KeyStatus::free().waiting(0));
        };
        let (token, lease) = (holder.create_revision(), holder.lease());
        let remaining = self
            .call(key, "reading the holder's lease", |mut client| async move {
                client.lease_time_to_live(lease, None).await
            })
            .await?
            .ttl();
        let mut status = KeyStatus::held().waiting(found.kvs().len() - 1);
        if let Ok(left) = u64::try_from(remaining) {
            status = status.remaining(Duration::from_secs(left));
        }
        if let Ok(token) = u64::try_from(token) {
            status = status.last_token(token);
        }
        Ok(status)
    }

    /// For operators, and unsafe: deletes the holder's key, whoever it is;
    /// the next waiter gets the lock. The holder learns it at once (its
    /// watch sees the deletion) but may still be writing; only fencing
    /// tokens protect the resource from it. Returns whether it was held.
    async fn force_release(&self, key: &str) -> Result<bool, LockError> {
        let queue = self.queue_prefix(key);
        let found = self
            .call(key, "finding the holder", |mut client| {
                let queue = queue.clone();
                async move { client.get(queue, Some(oldest_waiter())).await }
            })
            .await?;
        let Some(holder) = found.kvs().first() else {
            return Ok(false);
        };
        let (name, revision) = (holder.key().to_vec(), holder.create_revision());
        let delete = Txn::new()
            .when([Compare::create_revision(name.clone(), CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(name, None)]);
        let response = self
            .call(key, "force-releasing", |client| transact(client, &delete))
            .await?;
        Ok(response.succeeded())
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

impl fmt::Debug for EtcdBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdBackendBuilder")
            .field("endpoints", &self.endpoints)
            .field("key_prefix", &self.key_prefix)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .field(
                "root_certificates",
                &self.root_certificates.as_ref().map(Vec::len),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_etcd_url_names_every_member() {
        let builder = super::EtcdBackend::builder(["etcd+https://root:pw@h1:2379,h2:2379"]);
        assert_eq!(builder.endpoints, ["https://h1:2379", "https://h2:2379"]);
        assert_eq!(builder.user, Some(("root".to_owned(), "pw".to_owned())));
        let plain = super::EtcdBackend::builder(["etcd://h1:2379"]);
        assert_eq!(plain.endpoints, ["http://h1:2379"]);
        assert_eq!(plain.user, None);
        assert!(
            super::EtcdBackend::builder(["etcd://u:secret@h1"])
                .invalid
                .is_some_and(|why| !why.contains("secret"))
        );
        assert!(
            super::EtcdBackend::builder(["http://h1:2379", "h2:2379"])
                .invalid
                .is_none()
        );
    }

    use super::check_endpoint;

    #[test]
    fn endpoints_are_checked() {
        for good in [
            "http://127.0.0.1:2379",
            "127.0.0.1:2379",
            "https://etcd.example:2379/",
        ] {
            assert!(check_endpoint(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "not a url",
            "redis://h:1",
            "http://h",
            "h:port",
            "http://:2379",
        ] {
            assert!(check_endpoint(bad).is_err(), "{bad}");
        }
    }
}
