//! The operations on one server, each one script under the command
//! timeout: what the single-server backend's `LockBackend` impl is made of,
//! and what Redlock runs on each of its nodes.

use std::time::Duration;

use dlock_core::backend::{Grant, OwnerToken, ReleaseOutcome, ensure_same_kind};
use dlock_core::{FencingToken, LockError, LockKind, NotHeldReason, drift_allowance};
use tokio::time::timeout;

#[cfg(feature = "redlock")]
use crate::connection::Commands;
use crate::errors::from_redis;
use crate::scripts::{self, ScriptCall};
use crate::{NodeGrant, RedisBackend};

impl RedisBackend {
    /// A call of `script` on the keys of `key` with these suffixes.
    pub(crate) fn call(&self, script: &'static redis::Script, key: &str, suffixes: &[&str]) -> ScriptCall {
        ScriptCall::new(script, &self.inner.prefix, key, suffixes)
    }

    /// A call of a script that reads the line: the lock, fence, line and
    /// places keys.
    pub(crate) fn line_call(&self, script: &'static redis::Script, key: &str) -> ScriptCall {
        self.call(
            script,
            key,
            &[scripts::LOCK, scripts::FENCE, scripts::LINE, scripts::PLACES],
        )
    }

    /// Releases with `script` (or, for a waiter, leaves the line) and hands
    /// the key on to the next waiters: a mutex's, a reader's, a permit's or
    /// a leader's release, or the clean-up that handles them all.
    pub(crate) async fn release_to_next(
        &self,
        script: &'static redis::Script,
        key: &str,
        owner: &OwnerToken,
        doing: &str,
    ) -> Result<ReleaseOutcome, LockError> {
        let call = self
            .line_call(script, key)
            .arg(owner.as_str())
            .arg(millis(self.place_lease()));
        let reply: redis::Value = self.run(key, doing, &call).await?;
        Ok(match reply {
            // Waiters of this client need not wait for the messages.
            redis::Value::BulkString(hand_over) => {
                self.inner.subscriber.handed_over(&hand_over);
                ReleaseOutcome::Released
            }
            redis::Value::Array(hand_overs) => {
                for hand_over in hand_overs {
                    if let redis::Value::BulkString(hand_over) = hand_over {
                        self.inner.subscriber.handed_over(&hand_over);
                    }
                }
                ReleaseOutcome::Released
            }
            redis::Value::Int(1) => ReleaseOutcome::Released,
            redis::Value::Int(0) => ReleaseOutcome::NotHeld(NotHeldReason::Expired),
            _ => ReleaseOutcome::NotHeld(NotHeldReason::OtherOwner),
        })
    }

    /// The owner-checked release of a Redlock node, whose waiters do not
    /// queue: wakes them all.
    #[cfg(feature = "redlock")]
    pub(crate) async fn release_owned(
        &self,
        key: &str,
        owner: &OwnerToken,
        doing: &str,
    ) -> Result<ReleaseOutcome, LockError> {
        let channel = self.release_channel(key);
        let call = self
            .call(&scripts::RELEASE, key, &[scripts::LOCK])
            .arg(owner.as_str())
            .arg(&channel);
        let status: i64 = self.run(key, doing, &call).await?;
        Ok(match status {
            1 => {
                // Local waiters need not wait for the message to come back.
                self.inner.subscriber.notify_local(&channel);
                ReleaseOutcome::Released
            }
            0 => ReleaseOutcome::NotHeld(NotHeldReason::Expired),
            _ => ReleaseOutcome::NotHeld(NotHeldReason::OtherOwner),
        })
    }

    /// One acquire script of `kind` on this server, never queueing: the
    /// fencing token when granted, else the holder's remaining TTL (None:
    /// the key has no TTL). A mutex's reads the lock key and counter only
    /// (Redlock's nodes run it too); a read lock's also reads the line, where
    /// a waiting writer keeps it out.
    pub(crate) async fn acquire_once(
        &self,
        kind: LockKind,
        key: &str,
        owner: &OwnerToken,
        ttl: Duration,
    ) -> Result<NodeGrant, LockError> {
        let call = match kind {
            LockKind::Exclusive => self
                .call(&scripts::ACQUIRE, key, &[scripts::LOCK, scripts::FENCE])
                .arg(owner.as_str())
                .arg(millis(ttl))
                .arg(""),
            LockKind::Semaphore { permits } => single_attempt(
                self.call(&scripts::ACQUIRE_PERMIT, key, &[scripts::LOCK, scripts::FENCE]),
                owner,
                ttl,
            )
            .arg(permits),
            LockKind::Shared => single_attempt(self.line_call(&scripts::ACQUIRE_SHARED, key), owner, ttl),
            other => return Err(LockError::unsupported(Some(key), other.to_string())),
        };
        self.acquire_call(key, kind, &call).await
    }

    /// One campaign in the election `key` with `value` (candidates never
    /// queue on Redis; see `scripts/election.rs`): the term when elected,
    /// else the leader's remaining lease.
    pub(crate) async fn elect(
        &self,
        key: &str,
        owner: &OwnerToken,
        ttl: Duration,
        value: &str,
    ) -> Result<NodeGrant, LockError> {
        let call = self
            .call(&scripts::ELECT, key, &[scripts::LOCK, scripts::FENCE])
            .arg(owner.as_str())
            .arg(millis(ttl))
            .arg(value);
        self.acquire_call(key, LockKind::Election, &call).await
    }

    /// One acquire script of `kind` that joins `key`'s line when busy
    /// (`joining`) or renews the owner's place in it.
    pub(crate) async fn acquire_in_line(
        &self,
        kind: LockKind,
        key: &str,
        owner: &OwnerToken,
        ttl: Duration,
        joining: bool,
        attempt: u64,
    ) -> Result<NodeGrant, LockError> {
        let script = match kind {
            LockKind::Semaphore { .. } => &scripts::ACQUIRE_PERMIT,
            LockKind::Shared => &scripts::ACQUIRE_SHARED,
            _ => &scripts::ACQUIRE,
        };
        let mut call = self
            .line_call(script, key)
            .arg(owner.as_str())
            .arg(millis(ttl))
            .arg(if joining { "join" } else { "queued" })
            .arg(millis(self.place_lease()))
            .arg(self.inner.subscriber.own_channel())
            .arg(attempt);
        if let LockKind::Semaphore { permits } = kind {
            call = call.arg(permits);
        }
        self.acquire_call(key, kind, &call).await
    }

    /// How long a place in line lasts unrenewed (three renewals): a waiter
    /// that died is passed over once it runs out. Also the longest
    /// reservation a release gives the next waiter (shorter when the waiter
    /// asked for a shorter TTL): how long a waiter that died since it last
    /// renewed its place can hold up the line.
    pub(crate) fn place_lease(&self) -> Duration {
        self.inner.waiter_renewal * 3
    }

    /// A granted lease's token and validity.
    pub(crate) fn grant(&self, token: u64, ttl: Duration) -> Grant {
        Grant::new(FencingToken::new(token), ttl.saturating_sub(drift_allowance(ttl)))
    }

    pub(crate) async fn acquire_call(
        &self,
        key: &str,
        kind: LockKind,
        call: &ScriptCall,
    ) -> Result<NodeGrant, LockError> {
        let reply: redis::Value = self.run(key, "acquiring", call).await?;
        match reply {
            redis::Value::Int(token) if token >= 1 => Ok(NodeGrant::Granted(token.unsigned_abs())),
            // 0: the holder's key has no TTL (set by hand); rely on notifications.
            redis::Value::Int(0) => Ok(NodeGrant::Busy(None)),
            redis::Value::Int(busy) => Ok(NodeGrant::Busy(Some(Duration::from_millis(
                (-1 - busy).unsigned_abs(),
            )))),
            other => Err(self.refusal(key, kind, &other)),
        }
    }

    /// The error for a script's reply that is neither a grant nor a busy
    /// answer: the key is in use as another kind (or a semaphore with
    /// another limit), its counter is broken, or it holds what dlock did
    /// not write. The same typed errors on every backend.
    pub(crate) fn refusal(&self, key: &str, asked_as: LockKind, reply: &redis::Value) -> LockError {
        let text = match reply {
            redis::Value::BulkString(text) => text.as_slice(),
            _ => b"",
        };
        let held_as = match text {
            b"mutex" => Some(LockKind::Exclusive),
            b"readers" => Some(LockKind::Shared),
            b"election" => Some(LockKind::Election),
            other => std::str::from_utf8(other)
                .ok()
                .and_then(|text| {
                    text.strip_prefix("semaphore:")
                        .or_else(|| text.strip_prefix("limit:"))
                })
                .and_then(|limit| limit.parse().ok())
                .map(|permits| LockKind::Semaphore { permits }),
        };
        if let Some(Err(error)) = held_as.map(|held_as| ensure_same_kind(key, held_as, asked_as)) {
            return error;
        }
        match text {
            b"counter" => self.broken_counter(key),
            b"wrongtype" => LockError::ForeignValue {
                key: key.to_owned(),
                found: format!("a value of another type at {}", self.lock_key(key)),
            },
            _ => LockError::ForeignValue {
                key: key.to_owned(),
                found: format!(
                    "a string at {} that is not a dlock owner token",
                    self.lock_key(key)
                ),
            },
        }
    }

    pub(crate) fn broken_counter(&self, key: &str) -> LockError {
        LockError::ForeignValue {
            key: key.to_owned(),
            found: format!(
                "a fencing counter at {} that is not an integer",
                self.fence_key(key)
            ),
        }
    }

    /// One owner-checked extension of a lease of `kind` on this server:
    /// `None` when extended, else why not.
    pub(crate) async fn extend_once(
        &self,
        kind: LockKind,
        key: &str,
        owner: &OwnerToken,
        ttl: Duration,
    ) -> Result<Option<NotHeldReason>, LockError> {
        // A reader's lease is kept as a permit is.
        let permit = matches!(kind, LockKind::Semaphore { .. } | LockKind::Shared);
        let script = match kind {
            _ if permit => &scripts::EXTEND_PERMIT,
            LockKind::Election => &scripts::EXTEND_LEADER,
            _ => &scripts::EXTEND,
        };
        let call = self
            .call(script, key, &[scripts::LOCK])
            .arg(owner.as_str())
            .arg(millis(ttl));
        let status: i64 = self.run(key, "extending", &call).await?;
        Ok(match status {
            1 => None,
            // A permit's (a reader's) end takes nothing from the others.
            _ if permit => Some(NotHeldReason::Expired),
            0 => Some(NotHeldReason::Expired),
            _ => Some(NotHeldReason::OtherOwner),
        })
    }

    /// The server's `run_id` (one server, not a Cluster or Sentinel
    /// group): two addresses of the same process answer the same one.
    #[cfg(feature = "redlock")]
    pub(crate) async fn server_run_id(&self) -> Result<Option<String>, LockError> {
        #[allow(irrefutable_let_patterns)] // without Cluster and Sentinel
        let Commands::Direct(connection) = &self.inner.commands else {
            return Ok(None);
        };
        let (mut connection, mut info) = (connection.clone(), redis::cmd("INFO"));
        let asking = info.arg("server").query_async::<String>(&mut connection);
        let info = match timeout(self.inner.command_timeout, asking).await {
            Ok(Ok(info)) => info,
            Ok(Err(error)) => return Err(from_redis(None, "reading the server's run_id", error)),
            Err(_) => {
                return Err(LockError::unavailable(
                    None,
                    format!(
                        "{} did not answer INFO within {:?}",
                        self.inner.address, self.inner.command_timeout
                    ),
                ));
            }
        };
        Ok(info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(|id| id.trim().to_owned()))
    }

    /// Raises this server's fencing counter for `key` to at least `token`.
    #[cfg(feature = "redlock")]
    pub(crate) async fn raise_fence(&self, key: &str, token: u64) -> Result<(), LockError> {
        let call = self
            .call(&scripts::RAISE_FENCE, key, &[scripts::FENCE])
            .arg(token);
        let status: i64 = self.run(key, "raising the fencing counter", &call).await?;
        if status == 1 {
            Ok(())
        } else {
            Err(self.broken_counter(key))
        }
    }

    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        key: &str,
        doing: &str,
        call: &ScriptCall,
    ) -> Result<T, LockError> {
        match timeout(self.inner.command_timeout, self.inner.commands.invoke(call)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(from_redis(Some(key), doing, error)),
            Err(_) => Err(LockError::unavailable(
                Some(key),
                format!(
                    "{doing}: {} did not answer within {:?}",
                    self.inner.address, self.inner.command_timeout
                ),
            )),
        }
    }
}

/// `ARGV[1..6]` of an acquire script for a single attempt: the owner, the
/// TTL, no queue mode, and the unused place arguments.
fn single_attempt(call: ScriptCall, owner: &OwnerToken, ttl: Duration) -> ScriptCall {
    call.arg(owner.as_str())
        .arg(millis(ttl))
        .arg("")
        .arg(0)
        .arg("")
        .arg(0)
}

pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
