//! Redlock: one lock over N independent Redis masters, granted by a
//! majority, with fencing tokens.
//!
//! Each node runs the same scripts as a single-server [`RedisBackend`] (one
//! per node, with its own connections and subscriber). An operation goes to
//! every node at once and ends as soon as its outcome is decided; the nodes
//! that had not answered by then still finish in the background, so a grant
//! or renewal reaches every live node, not just the fastest majority.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dlock_core::backend::{
    AcquireRequest, Attempt, Busy, ExtendOutcome, Grant, Lease, LockBackend, OwnerToken, ReleaseEvents,
    ReleaseOutcome, async_trait,
};
use dlock_core::{FencingToken, KeyStatus, LockError, LockKind, NotHeldReason};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tracing::debug;

use crate::NodeGrant;

/// A lock backend over N independent Redis masters (the Redlock algorithm),
/// with fencing tokens.
///
/// A lock is granted when a majority (N/2 + 1) of nodes granted it within
/// the TTL minus the time spent and the clock drift allowance. Use 5 nodes
/// on separate machines to tolerate 2 failures. Cheap to clone.
///
/// ```no_run
/// use dlock_redis::{Locker, RedlockBackend};
///
/// # async fn demo() -> Result<(), dlock_redis::LockError> {
/// let backend = RedlockBackend::connect([
///     "redis://10.0.0.1:6379",
///     "redis://10.0.0.2:6379",
///     "redis://10.0.0.3:6379",
///     "redis://10.0.0.4:6379",
///     "redis://10.0.0.5:6379",
/// ])
/// .await?;
/// let guard = Locker::new(backend).lock("orders/42").await?;
/// let token = guard.fencing_token(); // rises across grants, see docs/SAFETY.md
/// # let _ = token;
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedlockBackend {
    inner: Arc<Redlock>,
}

struct Redlock {
    nodes: Vec<Node>,
    quorum: usize,
    node_timeout: Duration,
    drift_factor: f64,
}

mod builder;
mod fan_out;
mod node;

pub use self::builder::RedlockBackendBuilder;
use self::fan_out::{Answers, count, failed, granted_tokens};
use self::node::Node;

impl RedlockBackend {
    /// Default limit for one node's answer: small next to any TTL, so that a
    /// slow or dead node costs little.
    pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(100);
    /// Default clock drift factor: drift = factor · ttl + 2 ms.
    pub const DEFAULT_DRIFT_FACTOR: f64 = 0.01;

    /// How many nodes must agree: N/2 + 1.
    pub fn quorum(&self) -> usize {
        self.inner.quorum
    }

    /// The number of nodes.
    pub fn node_count(&self) -> usize {
        self.inner.nodes.len()
    }

    /// Clock drift allowance for a TTL: factor · ttl + 2 ms.
    fn drift(&self, ttl: Duration) -> Duration {
        ttl.mul_f64(self.inner.drift_factor) + Duration::from_millis(2)
    }

    /// Owner-checked release on every node at once; waits for every node's
    /// answer (each bounded by the node timeout).
    async fn release_on(
        &self,
        key: &str,
        owner: &OwnerToken,
        doing: &'static str,
    ) -> Answers<ReleaseOutcome> {
        let owner = owner.clone();
        self.fan_out_all(key, move |_, node, key| {
            let owner = owner.clone();
            async move { node.release_owned(&key, &owner, doing).await }
        })
        .await
    }

    /// Undoes a failed acquisition on every node that may hold our value:
    /// all but those that answered busy (held by another owner). `answers`
    /// must be settled, so that no grant is still on its way.
    async fn undo(&self, key: &str, owner: &OwnerToken, answers: &Answers<NodeGrant>) {
        let maybe_ours: Vec<bool> = answers
            .iter()
            .map(|answer| !matches!(answer, Some(Ok(NodeGrant::Busy(_)))))
            .collect();
        if !maybe_ours.contains(&true) {
            return;
        }
        let owner = owner.clone();
        self.fan_out_all(key, move |index, node, key| {
            let skip = !maybe_ours[index];
            let owner = owner.clone();
            async move {
                if skip {
                    return Ok(ReleaseOutcome::NotHeld(NotHeldReason::OtherOwner));
                }
                node.release_owned(&key, &owner, "undoing a failed acquisition")
                    .await
            }
        })
        .await;
    }

    /// "node A: cause; node B: cause" for the nodes that failed.
    fn node_failures<T>(&self, answers: &[Option<Result<T, LockError>>]) -> String {
        answers
            .iter()
            .zip(&self.inner.nodes)
            .filter_map(|(answer, node)| match answer {
                Some(Err(LockError::Unavailable { message, .. })) => {
                    Some(format!("{}: {message}", node.address))
                }
                Some(Err(error)) => Some(format!("{}: {error}", node.address)),
                None => Some(format!("{}: no answer yet", node.address)),
                Some(Ok(_)) => None,
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[async_trait]
impl LockBackend for RedlockBackend {
    fn name(&self) -> &'static str {
        "redlock"
    }

    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt, LockError> {
        if request.kind != LockKind::Exclusive {
            let why = if request.kind == LockKind::Election {
                "an election's value and its observers need one ordered history of changes, and \
                 independent masters keep none without consensus"
            } else {
                "a set of leases on one key and a waiting line cannot be kept consistent across \
                 independent masters without consensus"
            };
            return Err(LockError::unsupported(
                Some(request.key),
                format!(
                    "{} on Redlock ({why}; use RedisBackend or EtcdBackend)",
                    request.kind
                ),
            ));
        }
        let (key, owner, ttl) = (request.key, request.owner, request.ttl);
        let started = Instant::now();
        let nodes = self.inner.nodes.len();
        let quorum = self.inner.quorum;
        let acquiring = owner.clone();
        let fan_out = self
            .fan_out(
                key,
                move |_, node, key| {
                    let owner = acquiring.clone();
                    async move { node.acquire_once(LockKind::Exclusive, &key, &owner, ttl).await }
                },
                |answers| {
                    let granted = count(answers, |grant| matches!(grant, NodeGrant::Granted(_)));
                    let refused = answers.iter().flatten().count() - granted;
                    granted >= quorum || nodes - refused < quorum
                },
            )
            .await;
        let tokens = granted_tokens(&fan_out.answers);
        if tokens.len() >= quorum {
            match self.agree_on_token(key, &tokens).await {
                Ok(token) => {
                    let drift = self.drift(ttl);
                    let elapsed = started.elapsed();
                    if ttl > elapsed + drift {
                        // The core counts validity from the request's start,
                        // so the time spent here is already subtracted.
                        return Ok(Attempt::Acquired(Grant::new(
                            FencingToken::new(token),
                            ttl - drift,
                        )));
                    }
                    debug!(?elapsed, "Redlock grant came too late to be valid");
                }
                Err(error) => {
                    self.undo(key, owner, &fan_out.settle().await).await;
                    return Err(error);
                }
            }
        }
        // Not granted: undo what we may hold anywhere, slow nodes included
        // once they have answered (or timed out), so no grant lands after
        // the undo.
        let mut answers = fan_out.settle().await;
        self.undo(key, owner, &answers).await;
        let tokens = granted_tokens(&answers);
        let foreign = answers
            .iter()
            .position(|answer| matches!(answer, Some(Err(LockError::ForeignValue { .. }))));
        if let Some(Some(Err(error))) = foreign.and_then(|index| answers.get_mut(index)).map(Option::take) {
            return Err(error);
        }
        let errors = failed(&answers);
        if tokens.len() + errors >= quorum && errors > 0 {
            return Err(LockError::unavailable(
                Some(key),
                format!(
                    "{} of {nodes} Redlock nodes granted, {quorum} needed; unreachable or failing: {}",
                    tokens.len(),
                    self.node_failures(&answers)
                ),
            ));
        }
        // Held elsewhere (or a split vote): free when enough holders expire.
        let mut remaining: Vec<Duration> = answers
            .iter()
            .filter_map(|answer| match answer {
                Some(Ok(NodeGrant::Busy(Some(remaining)))) => Some(*remaining),
                _ => None,
            })
            .collect();
        remaining.sort_unstable();
        let needed = quorum.saturating_sub(tokens.len()).max(1);
        let mut busy = match remaining.get(needed - 1).or(remaining.last()) {
            Some(remaining) => Busy::new().retry_after(*remaining),
            None => Busy::new().retry_after(self.inner.node_timeout),
        };
        if !tokens.is_empty() {
            // A split vote: others asked at the same moment. Retrying on the
            // same notification would split again; wait a random few round
            // trips so that one of us goes first.
            let round = started.elapsed().max(Duration::from_micros(100));
            busy = busy.hold_off(round.mul_f64(fastrand::f64() * 3.0));
        }
        Ok(Attempt::Busy(busy))
    }

    async fn extend(&self, lease: &Lease, ttl: Duration) -> Result<ExtendOutcome, LockError> {
        let (key, owner) = (lease.key(), lease.owner());
        let nodes = self.inner.nodes.len();
        let quorum = self.inner.quorum;
        let extending = owner.clone();
        let answers = self
            .fan_out(
                key,
                move |_, node, key| {
                    let owner = extending.clone();
                    async move { node.extend_once(LockKind::Exclusive, &key, &owner, ttl).await }
                },
                |answers| {
                    let extended = count(answers, Option::is_none);
                    let refused = answers.iter().flatten().count() - extended;
                    extended >= quorum || nodes - refused < quorum
                },
            )
            .await
            .answers;
        let extended = count(&answers, Option::is_none);
        if extended >= quorum {
            return Ok(ExtendOutcome::Extended {
                validity: ttl.saturating_sub(self.drift(ttl)),
            });
        }
        let errors = failed(&answers);
        if extended + errors >= quorum {
            return Err(LockError::unavailable(
                Some(key),
                format!(
                    "renewal reached {extended} of {nodes} Redlock nodes, {quorum} needed; {}",
                    self.node_failures(&answers)
                ),
            ));
        }
        let taken = count(&answers, |answer| *answer == Some(NotHeldReason::OtherOwner)) > 0;
        Ok(ExtendOutcome::NotHeld(if taken {
            NotHeldReason::OtherOwner
        } else {
            NotHeldReason::Expired
        }))
    }

    async fn release(&self, lease: &Lease) -> Result<ReleaseOutcome, LockError> {
        let key = lease.key();
        // Waits for every node, not just a majority: a caller that exits
        // right after release (a CLI run, a job) would otherwise leave copies
        // on the slower nodes until the TTL, and while they live, one more
        // node down would keep everyone from a majority.
        let answers = self.release_on(key, lease.owner(), "releasing").await;
        let answered = answers.iter().flatten().filter(|answer| answer.is_ok()).count();
        if answered < self.inner.quorum {
            // Too few nodes confirm: a majority may still hold our value.
            return Err(LockError::unavailable(
                Some(key),
                format!(
                    "release confirmed by {answered} of {} Redlock nodes, {} needed; the lock ends with its TTL at the latest; {}",
                    self.inner.nodes.len(),
                    self.inner.quorum,
                    self.node_failures(&answers)
                ),
            ));
        }
        if failed(&answers) > 0 {
            // A minority that did not answer keeps at most a stale copy,
            // which cannot make a majority and expires with the TTL.
            debug!(failures = %self.node_failures(&answers), "released on a majority; some nodes did not answer");
        }
        Ok(
            if count(&answers, |outcome| *outcome == ReleaseOutcome::Released) > 0 {
                ReleaseOutcome::Released
            } else if count(&answers, |outcome| {
                *outcome == ReleaseOutcome::NotHeld(NotHeldReason::OtherOwner)
            }) > 0
            {
                ReleaseOutcome::NotHeld(NotHeldReason::OtherOwner)
            } else {
                ReleaseOutcome::NotHeld(NotHeldReason::Expired)
            },
        )
    }

    async fn abandon(&self, key: &str, owner: &OwnerToken) -> Result<(), LockError> {
        let answers = self.release_on(key, owner, "cleaning up").await;
        match failed(&answers) {
            0 => Ok(()),
            _ => Err(LockError::unavailable(
                Some(key),
                format!("cleaning up: {}", self.node_failures(&answers)),
            )),
        }
    }

    async fn subscribe(&self, key: &str) -> Result<ReleaseEvents, LockError> {
        // Any node's release notification is worth a new attempt.
        let (sender, receiver) = mpsc::channel(1);
        let answers = self
            .fan_out_all(key, |_, node, key| async move { node.subscribe(&key).await })
            .await;
        let mut listening = 0;
        for answer in answers {
            let Some(Ok(mut events)) = answer else { continue };
            listening += 1;
            let sender = sender.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = sender.closed() => return,
                        more = events.recv() => {
                            if !more {
                                return;
                            }
                            // A full channel already holds a wake-up.
                            let _ = sender.try_send(());
                        }
                    }
                }
            });
        }
        if listening == 0 {
            return Ok(ReleaseEvents::never());
        }
        Ok(ReleaseEvents::from_channel(receiver))
    }
    /// For operators: held when a majority of nodes hold the key; the
    /// remaining time is how long a majority still holds it; the last token
    /// is the highest counter on any node.
    async fn inspect(&self, key: &str) -> Result<KeyStatus, LockError> {
        let answers = self
            .fan_out_all(key, |_, node, key| async move { node.inspect(&key).await })
            .await;
        let statuses: Vec<&KeyStatus> = answers
            .iter()
            .flatten()
            .filter_map(|answer| answer.as_ref().ok())
            .collect();
        if statuses.len() < self.inner.quorum {
            return Err(LockError::unavailable(
                Some(key),
                format!(
                    "only {} Redlock nodes answered: {}",
                    statuses.len(),
                    self.node_failures(&answers)
                ),
            ));
        }
        let mut remaining: Vec<Duration> = statuses
            .iter()
            .filter(|status| status.held)
            .map(|status| status.remaining.unwrap_or(Duration::MAX))
            .collect();
        remaining.sort_unstable_by(|a, b| b.cmp(a));
        let mut status = if remaining.len() >= self.inner.quorum {
            match remaining[self.inner.quorum - 1] {
                Duration::MAX => KeyStatus::held(),
                left => KeyStatus::held().remaining(left),
            }
        } else {
            KeyStatus::free()
        };
        if let Some(token) = statuses.iter().filter_map(|status| status.last_token).max() {
            status = status.last_token(token);
        }
        Ok(status)
    }

    /// For operators, and unsafe: deletes the lock on every node, whoever
    /// holds it (see `RedisBackend`'s `force_release`). Returns whether any
    /// node had it.
    async fn force_release(&self, key: &str) -> Result<bool, LockError> {
        let answers = self
            .fan_out_all(key, |_, node, key| async move { node.force_release(&key).await })
            .await;
        if failed(&answers) > 0 {
            return Err(LockError::unavailable(
                Some(key),
                format!("force release failed on: {}", self.node_failures(&answers)),
            ));
        }
        Ok(count(&answers, |deleted| *deleted) > 0)
    }
}

impl RedlockBackend {
    /// The fencing token of a grant: the highest counter among the granting
    /// nodes, after raising lagging granting nodes to it so that a majority
    /// holds at least that value (the next grant's majority shares a node
    /// with it, and that node's counter then goes higher still).
    async fn agree_on_token(&self, key: &str, tokens: &[(usize, u64)]) -> Result<u64, LockError> {
        let highest = tokens.iter().map(|(_, token)| *token).max().unwrap_or(0);
        let at_highest = tokens.iter().filter(|(_, token)| *token == highest).count();
        if at_highest >= self.inner.quorum {
            return Ok(highest);
        }
        let lagging: Vec<usize> = tokens
            .iter()
            .filter(|(_, token)| *token < highest)
            .map(|(index, _)| *index)
            .collect();
        let raised = futures_util::future::join_all(lagging.iter().map(|&index| async move {
            let node = &self.inner.nodes[index];
            timeout(self.inner.node_timeout, async {
                node.backend().await?.raise_fence(key, highest).await
            })
            .await
            .map_err(|_| LockError::unavailable(Some(key), format!("{}: no answer", node.address)))
            .and_then(|outcome| outcome)
        }))
        .await;
        let confirmed = at_highest + raised.iter().filter(|outcome| outcome.is_ok()).count();
        if confirmed >= self.inner.quorum {
            debug!(
                highest,
                raised = confirmed - at_highest,
                "Redlock fencing counters brought level"
            );
            return Ok(highest);
        }
        let causes: Vec<String> = raised
            .into_iter()
            .filter_map(Result::err)
            .map(|error| error.to_string())
            .collect();
        Err(LockError::unavailable(
            Some(key),
            format!(
                "granted, but only {confirmed} nodes confirm fencing token {highest} ({} needed): {}",
                self.inner.quorum,
                causes.join("; ")
            ),
        ))
    }
}

impl fmt::Debug for RedlockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<&str> = self
            .inner
            .nodes
            .iter()
            .map(|node| node.address.as_str())
            .collect();
        f.debug_struct("RedlockBackend")
            .field("nodes", &nodes)
            .field("quorum", &self.inner.quorum)
            .field("node_timeout", &self.inner.node_timeout)
            .finish_non_exhaustive()
    }
}
