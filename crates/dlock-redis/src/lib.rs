//! Redis backend for [dlock](dlock_core): distributed locks with fencing
//! tokens, loss signals and pub/sub wake-ups, on a single Redis server, a
//! Redis Cluster (`RedisBackend::connect_cluster`) or a Sentinel-managed
//! master (`RedisBackend::connect_sentinel`).
//!
//! Every lock operation is one round trip: a Lua script called by EVALSHA
//! (loaded on first use). The lock key holds the owner's secret with a PX
//! TTL; a counter key in the same hash slot gives the fencing token.
//! Waiters stand in a line on the server; a release hands the lock straight
//! to the first waiter (a short reservation with a new fencing token) and
//! tells the waiter's backend on that backend's own channel, read by one
//! pub/sub connection per backend. A waiter with auto-renewal takes the
//! lock from that message; one without makes it its own with one round
//! trip.
//!
//! ```no_run
//! use std::time::Duration;
//! use dlock_redis::{Locker, RedisBackend};
//!
//! # async fn demo() -> Result<(), dlock_redis::LockError> {
//! let backend = RedisBackend::connect("redis://127.0.0.1:6379/0").await?;
//! let locker = Locker::new(backend);
//! let guard = locker.lock("orders/42").ttl(Duration::from_secs(10)).await?;
//! let token = guard.fencing_token(); // send it with every write
//! # let _ = token;
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! Keys in Redis: `{prefix}{<key>}` holds the lock, `{prefix}{<key>}:fence`
//! the fencing counter (kept forever so tokens keep rising; one small key
//! per lock name), `{prefix}{<key>}:line` and `{prefix}{<key>}:places` the
//! waiters' line (only while someone waits), and `{prefix}{<key>}:released`
//! is the release channel.

//!
//! # Features
//!
//! | feature | default | brings |
//! |---|---|---|
//! | `cluster` | on | `RedisBackend::connect_cluster`, `redis+cluster://` URLs (redis-rs `cluster-async`) |
//! | `sentinel` | on | `RedisBackend::connect_sentinel`, `redis+sentinel://` URLs (redis-rs `sentinel`) |
//! | `redlock` | on | `RedlockBackend`, over N independent masters |
//! | `tls` | on | `rediss://` URLs and `tls_root_certificates` (rustls with the ring provider) |
//!
//! All are on by default: someone who adds dlock-redis expects every
//! deployment its documentation shows to connect. `default-features =
//! false` gives a single-server backend with the fewest crates.
//!
//! dlock never installs a process-wide rustls `CryptoProvider`. With `tls`,
//! rustls is built with ring alone and picks it by itself; if your program
//! also enables another provider (aws-lc-rs, through another crate),
//! install one with `CryptoProvider::install_default` before connecting.

#![forbid(unsafe_code)]

mod builder;
mod connection;
mod errors;
mod node_ops;
#[cfg(feature = "redlock")]
mod redlock;
mod scripts;
mod subscriber;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dlock_core::backend::{
    AcquireRequest, Attempt, Busy, ExtendOutcome, Grant, LeaderState, Lease, LockBackend, OwnerToken,
    ProclaimOutcome, ReleaseEvents, ReleaseOutcome, async_trait,
};
pub use dlock_core::user_api::*;
pub use redis;
use tokio::time::Instant;

use crate::connection::Commands;
use crate::node_ops::millis;
#[cfg(feature = "redlock")]
pub use crate::redlock::{RedlockBackend, RedlockBackendBuilder};
use crate::subscriber::Subscriber;

pub use crate::builder::RedisBackendBuilder;

// The defaults are associated constants (`RedisBackend::DEFAULT_...`):
// `use dlock_redis::*; use dlock_etcd::*;` must not bring two items of one
// name.
/// A lock backend on one Redis server, a Redis Cluster, or the master of a
/// Sentinel group.
///
/// Cheap to clone; clones share one multiplexed command connection
/// (concurrent commands are pipelined on it; on Cluster, one per node),
/// which reconnects by itself after a restart or failover, and one pub/sub
/// connection for waiters.
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    commands: Commands,
    subscriber: Arc<Subscriber>,
    prefix: String,
    command_timeout: Duration,
    address: String,
    /// How often a waiter renews its place in line (and reads the lock, in
    /// case the message that handed it the lock was lost).
    waiter_renewal: Duration,
}

/// What one server answered to an acquire script.
pub(crate) enum NodeGrant {
    /// Taken; the server's fencing counter after the bump.
    Granted(u64),
    /// Held by another owner, for this long (if the key has a TTL).
    Busy(Option<Duration>),
}

impl RedisBackend {
    /// Default key prefix.
    pub const DEFAULT_KEY_PREFIX: &str = "dlock:";
    /// Default limit for one command's round trip.
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default limit for opening a connection.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default for how often a waiter renews its place in a key's line.
    pub const DEFAULT_WAITER_RENEWAL: Duration = Duration::from_secs(1);

    /// The Redis key that holds the lock for `key`.
    pub fn lock_key(&self, key: &str) -> String {
        scripts::key_name(&self.inner.prefix, key, scripts::LOCK)
    }

    /// The Redis key that holds the fencing counter for `key`.
    pub fn fence_key(&self, key: &str) -> String {
        scripts::key_name(&self.inner.prefix, key, scripts::FENCE)
    }

    /// The Redis list of the owners waiting for `key`, in arrival order.
    pub fn line_key(&self, key: &str) -> String {
        scripts::key_name(&self.inner.prefix, key, scripts::LINE)
    }

    /// The Redis hash of the places in `key`'s line (owner to the place's
    /// deadline, the TTL asked for, the waiter's attempt and its backend's
    /// channel).
    pub fn places_key(&self, key: &str) -> String {
        scripts::key_name(&self.inner.prefix, key, scripts::PLACES)
    }

    /// The pub/sub channel on which releases of `key` are announced.
    pub fn release_channel(&self, key: &str) -> String {
        scripts::key_name(&self.inner.prefix, key, scripts::RELEASED)
    }
}

#[async_trait]
impl LockBackend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt, LockError> {
        let (key, owner, ttl, kind) = (request.key, request.owner, request.ttl, request.kind);
        // Candidates never stand in line: they wait on the key's release
        // channel, which every change of the election is announced on.
        if kind == LockKind::Election || !request.queue {
            let once = match kind {
                LockKind::Election => self.elect(key, owner, ttl, request.value()).await?,
                _ => self.acquire_once(kind, key, owner, ttl).await?,
            };
            return Ok(match once {
                NodeGrant::Granted(token) => Attempt::Acquired(self.grant(token, ttl)),
                NodeGrant::Busy(Some(remaining)) => Attempt::Busy(Busy::new().retry_after(remaining)),
                NodeGrant::Busy(None) => Attempt::Busy(Busy::new()),
            });
        }
        let began = Instant::now();
        let subscriber = &self.inner.subscriber;
        let in_line = subscriber.is_in_line(owner.as_str());
        if in_line && request.auto_renew {
            // Handed over while this waiter waited: the lease runs from
            // before the hand-over for the reservation the server set
            // (named in the message: the releaser's settings decide it),
            // which renewal extends; no round trip needed.
            if let Some(hand_over) = subscriber.take_hand_over(owner.as_str()) {
                let reservation = hand_over.reservation.min(ttl);
                let lasts_until = hand_over.since + reservation.saturating_sub(drift_allowance(reservation));
                let validity = lasts_until.saturating_duration_since(began);
                if validity >= reservation / 2 {
                    subscriber.leave_line(owner.as_str());
                    return Ok(Attempt::Acquired(Grant::new(
                        FencingToken::new(hand_over.token),
                        validity,
                    )));
                }
            }
        }
        // While hand-overs reach this backend, record the waiter before the
        // round trip, so that a hand-over announced while it is in flight
        // still wakes it.
        let listening = subscriber.listens_on_own_channel();
        if listening {
            subscriber.join_line(owner.as_str());
        }
        let attempt = subscriber.begin_attempt(owner.as_str());
        let number = attempt.as_ref().map_or(0, |(number, _)| *number);
        let remaining = match self
            .acquire_in_line(kind, key, owner, ttl, !in_line, number)
            .await?
        {
            NodeGrant::Granted(token) => {
                if attempt.is_some() {
                    subscriber.leave_line(owner.as_str());
                }
                return Ok(Attempt::Acquired(self.grant(token, ttl)));
            }
            NodeGrant::Busy(remaining) => remaining,
        };
        if let (Some((number, events)), true) = (attempt, listening) {
            subscriber.found_busy(owner.as_str(), number, began);
            // Come back before the place runs out, or when the lock does.
            let renewal = self.inner.waiter_renewal;
            let renew_in = remaining.map_or(renewal, |remaining| remaining.min(renewal));
            return Ok(Attempt::Busy(Busy::new().retry_after(renew_in).wake(events)));
        }
        // Hand-overs did not reach this backend until now: listen, then
        // read the lock again at once, in case it was handed over meanwhile.
        subscriber.listen_on_own_channel(key).await?;
        subscriber.join_line(owner.as_str());
        subscriber.found_busy(owner.as_str(), number, began);
        let events = subscriber
            .events(owner.as_str())
            .unwrap_or_else(ReleaseEvents::never);
        Ok(Attempt::Busy(
            Busy::new().retry_after(Duration::ZERO).wake(events),
        ))
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<ExtendOutcome, LockError> {
        let not_held = self
            .extend_once(lease.kind(), lease.key(), lease.owner(), ttl)
            .await?;
        Ok(match not_held {
            None => ExtendOutcome::Extended {
                validity: ttl.saturating_sub(drift_allowance(ttl)),
            },
            Some(reason) => ExtendOutcome::NotHeld(reason),
        })
    }

    async fn release(&self, lease: &Lease) -> Result<ReleaseOutcome, LockError> {
        let script = match lease.kind() {
            LockKind::Semaphore { .. } => &scripts::RELEASE_PERMIT,
            LockKind::Shared => &scripts::RELEASE_SHARED,
            LockKind::Election => &scripts::RESIGN,
            _ => &scripts::RELEASE_TO_NEXT,
        };
        self.release_to_next(script, lease.key(), lease.owner(), "releasing")
            .await
    }

    async fn abandon(&self, key: &str, owner: &OwnerToken) -> Result<(), LockError> {
        self.inner.subscriber.leave_line(owner.as_str());
        // A cancelled request's kind is not known here; the script looks.
        self.release_to_next(&scripts::ABANDON, key, owner, "cleaning up")
            .await
            .map(drop)
    }

    async fn subscribe(&self, key: &str) -> Result<ReleaseEvents, LockError> {
        self.inner
            .subscriber
            .subscribe(key, &self.release_channel(key))
            .await
    }

    async fn proclaim(&self, lease: &Lease, value: &str) -> Result<ProclaimOutcome, LockError> {
        let key = lease.key();
        let call = self
            .call(&scripts::PROCLAIM, key, &[scripts::LOCK])
            .arg(lease.owner().as_str())
            .arg(value);
        let status: i64 = self.run(key, "proclaiming", &call).await?;
        Ok(match status {
            1 => ProclaimOutcome::Proclaimed,
            0 => ProclaimOutcome::NotHeld(NotHeldReason::Expired),
            _ => ProclaimOutcome::NotHeld(NotHeldReason::OtherOwner),
        })
    }

    async fn leader(&self, key: &str) -> Result<Option<LeaderState>, LockError> {
        let call = self.call(&scripts::LEADER, key, &[scripts::LOCK]);
        let reply: redis::Value = self.run(key, "reading the leader", &call).await?;
        match reply {
            redis::Value::Array(fields) if fields.is_empty() => Ok(None),
            redis::Value::Array(fields) => {
                let (term, value, remaining): (u64, String, i64) = redis::FromRedisValue::from_redis_value(
                    redis::Value::Array(fields),
                )
                .map_err(|error| LockError::unavailable(Some(key), format!("reading the leader: {error}")))?;
                let remaining = u64::try_from(remaining).ok().map(Duration::from_millis);
                Ok(Some(LeaderState::new(value, FencingToken::new(term), remaining)))
            }
            // The key is in use as another kind: the reply names it, as
            // an acquire script's does.
            other => Err(self.refusal(key, LockKind::Election, &other)),
        }
    }

    /// Whether `key` is held, for how long, and the last fencing token
    /// handed out (never the owner's secret). One round trip.
    async fn inspect(&self, key: &str) -> Result<KeyStatus, LockError> {
        let call = self.call(&scripts::STATUS, key, &[scripts::LOCK, scripts::FENCE]);
        let (pttl, counter, holders, limit): (i64, i64, i64, i64) =
            self.run(key, "inspecting", &call).await?;
        let status = match (u32::try_from(limit), usize::try_from(holders)) {
            // A read lock's readers: the limit 0.
            (Ok(0), Ok(holders)) if holders > 0 => KeyStatus::held().kind(LockKind::Shared).holders(holders),
            (Err(_), Ok(1)) if limit == -2 => KeyStatus::held().kind(LockKind::Election).holders(1),
            (Ok(permits), Ok(holders)) if holders > 0 => KeyStatus::held()
                .kind(LockKind::Semaphore { permits })
                .holders(holders),
            (Ok(_), Ok(_)) => KeyStatus::free(),
            _ if pttl == -2 => KeyStatus::free(),
            _ => KeyStatus::held().kind(LockKind::Exclusive).holders(1),
        };
        let status = match u64::try_from(pttl) {
            Ok(left) => status.remaining(Duration::from_millis(left)),
            Err(_) => status,
        };
        Ok(match u64::try_from(counter) {
            Ok(token) => status.last_token(token),
            Err(_) => status,
        })
    }

    /// Deletes the lock on `key` whoever holds it, and hands it to the
    /// first waiter in line. The holder is not told until its next renewal
    /// (within a third of its TTL). Returns whether there was a lock.
    async fn force_release(&self, key: &str) -> Result<bool, LockError> {
        let channel = self.release_channel(key);
        let call = self
            .line_call(&scripts::FORCE_RELEASE, key)
            .arg(&channel)
            .arg(millis(self.place_lease()));
        let deleted: i64 = self.run(key, "force-releasing", &call).await?;
        Ok(deleted == 1)
    }
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("address", &self.inner.address)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}
