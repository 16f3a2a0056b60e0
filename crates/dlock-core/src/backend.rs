//! The API for writing a backend: the contract between
//! [`Locker`](crate::Locker) and a storage, and the helpers a backend uses.
//! Users of dlock need none of it; the crate root has the user API.

pub use async_trait::async_trait;

pub use crate::backoff::Backoff;
pub use crate::kind::{LockKind, ensure_same_kind};

pub use crate::notify::{HubSubscription, ReleaseEvents, ReleaseHub};
pub use crate::options::{validate_permits, validate_timeout, validate_ttl, validate_value, validate_wait};
pub use crate::owner::OwnerToken;
pub use crate::url::{HostListUrl, redact_url};

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::error::{LockError, NotHeldReason};
use crate::leader::Leader;
use crate::status::KeyStatus;
use crate::token::FencingToken;

/// A storage that can hold leases on keys: Redis, etcd, memory, ...
///
/// The trait is small on purpose: one attempt, extend, release, clean-up, and
/// notifications. Waiting, deadlines, backoff, renewal, loss detection,
/// validation and tracing live once in [`Locker`](crate::Locker) and
/// [`LockGuard`](crate::LockGuard), so that every backend behaves alike.
///
/// # Contract
///
/// Keys reach the backend already validated by
/// [`validate_key`](crate::validate_key); TTLs by
/// [`validate_ttl`]. Each method is one atomic,
/// owner-checked step on the server:
///
/// * [`try_acquire`](Self::try_acquire): if nobody holds `key`, make `owner`
///   its holder for `ttl` and return [`Attempt::Acquired`] with a
///   [`FencingToken`] greater than every token ever returned for this key
///   (by any client, as long as the storage keeps its data). If `owner`
///   already holds the key (a retried request), grant it again with the same
///   token. If someone else holds it, change nothing and return
///   [`Attempt::Busy`], with the holder's remaining lease as
///   `retry_after` when the backend knows it. With
///   [`AcquireRequest::queue`] set the backend may keep a place in a queue
///   for `owner` between attempts; the caller then either tries again with the
///   same owner or calls [`abandon`](Self::abandon).
/// * [`extend`](Self::extend): reset the lease to `ttl` only if the lease's
///   owner still holds the key; otherwise report [`ExtendOutcome::NotHeld`]
///   and change nothing.
/// * [`release`](Self::release): end the lease only if its owner still holds
///   the key, and wake the key's waiters; otherwise report
///   [`ReleaseOutcome::NotHeld`] and change nothing.
/// * [`abandon`](Self::abandon): remove whatever `owner` may have left for
///   `key` (a lock taken by a request that was then cancelled, a queue entry).
///   Succeeds when there was nothing.
/// * [`subscribe`](Self::subscribe): start listening for releases of `key`;
///   only releases after it returns need to wake the events. On an
///   election's key, every change of leader or value wakes them too (a
///   campaign won, a proclamation, a resignation): observers re-read the
///   leader on each.
///
/// Elections ([`LockKind::Election`]) add two steps, which default to
/// [`LockError::Unsupported`]:
///
/// * [`proclaim`](Self::proclaim): set the election's public value only if
///   the lease's owner still leads; the term (the fencing token) stays.
/// * [`leader`](Self::leader): the leader's value and term, and how long
///   its lease is certain to last, or `None` when nobody leads. A lease
///   that has ended is never reported.
///
/// `Ok` results are definite answers from the storage. Anything that leaves
/// the outcome unknown (I/O error, timeout, no quorum) is
/// [`LockError::Unavailable`]; a value at the key that the backend did not
/// write is [`LockError::ForeignValue`] and must be left untouched.
///
/// # Validity
///
/// [`Grant::validity`] and [`ExtendOutcome::Extended`] say for how long the
/// lease is certain to last, counted from the moment the call *began* (the
/// caller measures that instant on a monotonic clock). A backend that passes
/// the TTL straight to one server returns `ttl - drift_allowance(ttl)`; one
/// that needs several servers subtracts what it knows more.
///
/// # Adding primitives
///
/// Requests carry a [`LockKind`]. New kinds (shared locks, semaphore permits)
/// are added as variants; a backend answers a kind it does not know with
/// [`LockError::Unsupported`], so old backends keep compiling and fail
/// clearly.
#[async_trait]
pub trait LockBackend: Send + Sync + 'static {
    /// One attempt to acquire; see the trait's contract.
    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt, LockError>;

    /// Resets the lease to `ttl` if it is still ours.
    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<ExtendOutcome, LockError>;

    /// Ends the lease if it is still ours, and wakes the key's waiters.
    async fn release(&self, lease: &Lease) -> Result<ReleaseOutcome, LockError>;

    /// Removes anything `owner` left for `key` after a cancelled or failed request.
    async fn abandon(&self, key: &str, owner: &OwnerToken) -> Result<(), LockError>;

    /// Starts listening for releases of `key`.
    async fn subscribe(&self, key: &str) -> Result<ReleaseEvents, LockError>;

    /// A short name for this kind of backend ("redis", "etcd", "memory"):
    /// the `backend` label of dlock's metrics. Default: "custom".
    fn name(&self) -> &'static str {
        "custom"
    }

    /// What this backend offers beyond the contract.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Sets the public value of the election `lease` leads, if it still
    /// leads; see the trait's contract. Default: [`LockError::Unsupported`].
    async fn proclaim(&self, lease: &Lease, value: &str) -> Result<ProclaimOutcome, LockError> {
        let _ = value;
        Err(LockError::unsupported(Some(lease.key()), "elections"))
    }

    /// The leader of the election `key`, or `None` when nobody leads; see
    /// the trait's contract. Default: [`LockError::Unsupported`].
    async fn leader(&self, key: &str) -> Result<Option<LeaderState>, LockError> {
        Err(LockError::unsupported(Some(key), "elections"))
    }

    /// For operators: what the storage holds for `key` (see [`KeyStatus`]),
    /// never an owner's secret. Default: [`LockError::Unsupported`].
    async fn inspect(&self, key: &str) -> Result<KeyStatus, LockError> {
        Err(LockError::unsupported(Some(key), "inspecting a key"))
    }

    /// For operators: ends the lock on `key` whoever holds it, and hands it
    /// to the next waiter if the backend keeps a line; returns whether it
    /// was held. Default: [`LockError::Unsupported`].
    async fn force_release(&self, key: &str) -> Result<bool, LockError> {
        Err(LockError::unsupported(Some(key), "force-releasing a key"))
    }
}

/// One attempt's parameters, built by [`Locker`](crate::Locker).
#[derive(Debug)]
#[non_exhaustive]
pub struct AcquireRequest<'a> {
    /// The key, validated.
    pub key: &'a str,
    /// The secret of this acquisition.
    pub owner: &'a OwnerToken,
    /// The lease length, validated.
    pub ttl: Duration,
    /// Whether the guard will renew the lease (a backend with sessions may
    /// put renewed locks on a shared session).
    pub auto_renew: bool,
    /// Whether the caller will wait: the backend may keep a queue place for
    /// `owner` when the key is busy. When false, a busy answer must leave
    /// nothing behind.
    pub queue: bool,
    /// The kind of lock.
    pub kind: LockKind,
    /// For [`LockKind::Election`]: the value the candidate campaigns with,
    /// public from the moment it leads. `None` for the other kinds.
    pub value: Option<&'a str>,
}

impl<'a> AcquireRequest<'a> {
    /// For backends that offer only [`LockKind::Exclusive`]: any other kind
    /// is [`LockError::Unsupported`].
    pub fn require_exclusive(&self) -> Result<(), LockError> {
        match self.kind {
            LockKind::Exclusive => Ok(()),
            other => Err(LockError::unsupported(Some(self.key), format!("{other}"))),
        }
    }

    pub(crate) fn new(
        key: &'a str,
        owner: &'a OwnerToken,
        ttl: Duration,
        auto_renew: bool,
        queue: bool,
        kind: LockKind,
        value: Option<&'a str>,
    ) -> Self {
        AcquireRequest {
            key,
            owner,
            ttl,
            auto_renew,
            queue,
            kind,
            value,
        }
    }

    /// The value an election's candidate campaigns with (empty for the
    /// other kinds).
    pub fn value(&self) -> &'a str {
        self.value.unwrap_or_default()
    }
}

/// The outcome of one acquisition attempt.
#[derive(Debug)]
#[non_exhaustive]
pub enum Attempt {
    /// The lock is ours.
    Acquired(Grant),
    /// Someone else holds the key.
    Busy(Busy),
}

/// A future a backend resolves when it learns, unprompted, that a lease was
/// lost (a watch on the lock key fired, a session ended).
pub type LossSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Backend-private data kept with a lease (node list, lease id, ...).
pub type LeaseHandle = Box<dyn Any + Send + Sync>;

/// A successful acquisition.
#[non_exhaustive]
pub struct Grant {
    /// The acquisition's fencing token.
    pub token: FencingToken,
    /// How long the lease is certain to last from the start of the call.
    pub validity: Duration,
    /// Backend-private data, handed back in [`Lease::handle`].
    pub handle: Option<LeaseHandle>,
    /// Resolves when the backend learns that the lease is gone.
    pub loss_signal: Option<LossSignal>,
}

impl Grant {
    /// A grant with no handle and no loss signal.
    pub fn new(token: FencingToken, validity: Duration) -> Self {
        Grant {
            token,
            validity,
            handle: None,
            loss_signal: None,
        }
    }

    /// Keeps backend-private data with the lease.
    pub fn with_handle(mut self, handle: impl Any + Send + Sync) -> Self {
        self.handle = Some(Box::new(handle));
        self
    }

    /// Lets the backend report a loss as soon as it sees it.
    pub fn with_loss_signal(mut self, signal: impl Future<Output = ()> + Send + 'static) -> Self {
        self.loss_signal = Some(Box::pin(signal));
        self
    }
}

impl fmt::Debug for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grant")
            .field("token", &self.token)
            .field("validity", &self.validity)
            .field("has_handle", &self.handle.is_some())
            .field("has_loss_signal", &self.loss_signal.is_some())
            .finish()
    }
}

/// A busy answer.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Busy {
    /// The holder's remaining lease, when known: the latest moment worth
    /// trying again if no release notification arrives.
    pub retry_after: Option<Duration>,
    /// A wake-up for this waiter alone (e.g. a watch on its predecessor in a
    /// fair queue). When set, the caller waits on it instead of the key's
    /// general subscription.
    pub wake: Option<ReleaseEvents>,
    /// Do not try again before this much time passed, even when notified:
    /// after a split vote (Redlock: several clients each got a minority),
    /// waiters that all retry on the same notification would split again,
    /// so each backs off for a random moment first.
    pub hold_off: Option<Duration>,
}

impl Busy {
    /// A busy answer with no hints.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the holder's remaining lease.
    pub fn retry_after(mut self, remaining: Duration) -> Self {
        self.retry_after = Some(remaining);
        self
    }

    /// Asks the waiter to stay away for `pause` before its next attempt.
    pub fn hold_off(mut self, pause: Duration) -> Self {
        self.hold_off = Some(pause);
        self
    }

    /// Adds a wake-up for this waiter alone.
    pub fn wake(mut self, events: ReleaseEvents) -> Self {
        self.wake = Some(events);
        self
    }
}

/// A held lease, as the backend sees it.
pub struct Lease {
    key: String,
    owner: OwnerToken,
    token: FencingToken,
    kind: LockKind,
    handle: Option<LeaseHandle>,
}

impl Lease {
    pub(crate) fn new(
        key: String,
        owner: OwnerToken,
        token: FencingToken,
        kind: LockKind,
        handle: Option<LeaseHandle>,
    ) -> Self {
        Lease {
            key,
            owner,
            token,
            kind,
            handle,
        }
    }

    /// The kind of lock this lease is (a mutex, a semaphore permit).
    pub fn kind(&self) -> LockKind {
        self.kind
    }

    /// The key, as the user named it.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner secret.
    pub fn owner(&self) -> &OwnerToken {
        &self.owner
    }

    /// The fencing token.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The backend-private data given in [`Grant::with_handle`], if it has type `T`.
    pub fn handle<T: Any>(&self) -> Option<&T> {
        self.handle.as_ref()?.downcast_ref()
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

/// The outcome of an owner-checked extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtendOutcome {
    /// The lease was reset; it is certain to last `validity` from the start of the call.
    Extended {
        /// See [`Grant::validity`].
        validity: Duration,
    },
    /// The lease is not ours any more; nothing was changed.
    NotHeld(NotHeldReason),
}

/// The outcome of an owner-checked release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReleaseOutcome {
    /// The lease was ended.
    Released,
    /// The lease was not ours any more; nothing was changed.
    NotHeld(NotHeldReason),
}

/// The outcome of an owner-checked proclamation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProclaimOutcome {
    /// The value was set; the lease still leads.
    Proclaimed,
    /// The lease does not lead any more; nothing was changed.
    NotHeld(NotHeldReason),
}

/// An election's leader as a backend reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaderState {
    /// Who leads: the value and the term.
    pub leader: Leader,
    /// How long the leader's lease is certain to last from the start of
    /// the call, when the backend knows it: observers read again when it
    /// ends, so that a leader that died is not reported for longer.
    pub remaining: Option<Duration>,
}

impl LeaderState {
    /// A leader with `value` and `term`, whose lease lasts `remaining`.
    pub fn new(value: impl Into<String>, term: FencingToken, remaining: Option<Duration>) -> Self {
        LeaderState {
            leader: Leader {
                value: value.into(),
                term,
            },
            remaining,
        }
    }
}

/// What a backend offers beyond the contract.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Waiters acquire in the order in which they first asked.
    pub fifo_fairness: bool,
}

impl Capabilities {
    /// Marks the backend as granting in arrival order.
    pub fn with_fifo_fairness(mut self) -> Self {
        self.fifo_fairness = true;
        self
    }
}
