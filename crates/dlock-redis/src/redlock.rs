//! Redlock: one lock over N independent Redis masters, granted by a
//! majority, with fencing tokens.
//!
//! Each node runs the same scripts as a single-server [`RedisBackend`] (one
//! per node, with its own connections and subscriber). An operation goes to
//! every node at once and ends as soon as its outcome is decided; the nodes
//! that had not answered by then still finish in the background, so a grant
//! or renewal reaches every live node, not just the fastest majority.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use dlock_core::backend::{
    AcquireRequest, Attempt, Busy, ExtendOutcome, Grant, HostListUrl, Lease, LockBackend, OwnerToken,
    ReleaseEvents, ReleaseOutcome, async_trait, redact_url, validate_timeout,
};
use dlock_core::{FencingToken, KeyStatus, LockError, NotHeldReason};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};
use tracing::debug;

use crate::{NodeGrant, RedisBackend, RedisBackendBuilder};

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

/// One master; connected at start, or later, in the background, if it was
/// down then.
struct Node {
    address: String,
    builder: RedisBackendBuilder,
    state: Arc<watch::Sender<NodeState>>,
}

/// Where a node's connection stands.
#[derive(Clone)]
enum NodeState {
    /// Not connected; no attempt under way. The last failure, if any.
    Down(Option<Arc<str>>),
    /// An attempt is under way in a task of its own.
    Connecting,
    Live(RedisBackend),
}

impl Node {
    fn new(address: String, builder: RedisBackendBuilder) -> Self {
        Node {
            address,
            builder,
            state: Arc::new(watch::Sender::new(NodeState::Down(None))),
        }
    }

    /// Connects at start, reporting why not.
    async fn connect(&self) -> Result<(), LockError> {
        let backend = self.builder.clone().connect().await?;
        self.state.send_replace(NodeState::Live(backend));
        Ok(())
    }

    /// The node's backend; if it is not connected, starts a connect in a
    /// task of its own and waits for it. The caller bounds the wait (the
    /// node timeout), never the connect: a connect that takes longer than
    /// the node timeout (a TLS handshake, a lost SYN) still completes and
    /// serves the next operation, instead of being cut off every time.
    async fn backend(&self) -> Result<RedisBackend, LockError> {
        let mut states = self.state.subscribe();
        self.state.send_if_modified(|state| {
            if !matches!(state, NodeState::Down(_)) {
                return false;
            }
            *state = NodeState::Connecting;
            let (builder, node) = (self.builder.clone(), Arc::clone(&self.state));
            let address = self.address.clone();
            tokio::spawn(async move {
                let next = match builder.connect().await {
                    Ok(backend) => NodeState::Live(backend),
                    Err(error) => {
                        debug!(%address, %error, "a Redlock node could not be reached; tried again on next use");
                        NodeState::Down(Some(Arc::from(error.to_string())))
                    }
                };
                node.send_replace(next);
            });
            true
        });
        let settled = states
            .wait_for(|state| !matches!(state, NodeState::Connecting))
            .await
            .map(|state| state.clone());
        match settled {
            Ok(NodeState::Live(backend)) => Ok(backend),
            Ok(NodeState::Down(Some(why))) => Err(LockError::unavailable(None, why.to_string())),
            _ => Err(LockError::unavailable(
                None,
                format!("{} is not connected", self.address),
            )),
        }
    }
}

/// Settings for [`RedlockBackend`]; start with [`RedlockBackend::builder`].
#[derive(Clone)]
pub struct RedlockBackendBuilder {
    urls: Vec<String>,
    /// Why a `redlock://` URL could not be read, reported by `connect`.
    invalid: Option<String>,
    key_prefix: String,
    node_timeout: Duration,
    connect_timeout: Duration,
    drift_factor: f64,
}

impl RedlockBackend {
    /// Default limit for one node's answer: small next to any TTL, so that a
    /// slow or dead node costs little.
    pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_millis(100);
    /// Default clock drift factor: drift = factor · ttl + 2 ms.
    pub const DEFAULT_DRIFT_FACTOR: f64 = 0.01;

    /// Connects to the masters at `urls` with default settings; at least a
    /// majority must answer (the others are retried on use). `urls` is
    /// either one `redis://[user:password@]host:port[/db]` URL per master,
    /// or a single `redlock://[user:password@]h1:port,h2:port,h3:port` URL
    /// naming them all (the credentials apply to each).
    pub async fn connect<I, S>(urls: I) -> Result<Self, LockError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::builder(urls).connect().await
    }

    /// Settings for the masters at `urls` (see [`connect`](Self::connect)
    /// for the forms).
    pub fn builder<I, S>(urls: I) -> RedlockBackendBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut urls: Vec<String> = urls.into_iter().map(|url| url.as_ref().to_owned()).collect();
        let mut invalid = None;
        if let [single] = urls.as_slice() {
            if single.starts_with("redlock://") {
                match HostListUrl::parse(single) {
                    Ok(parsed) => {
                        let userinfo = parsed.userinfo();
                        urls = parsed
                            .hosts
                            .iter()
                            .map(|host| format!("redis://{userinfo}{host}"))
                            .collect();
                    }
                    Err(reason) => invalid = Some(reason),
                }
            }
        }
        RedlockBackendBuilder {
            urls,
            invalid,
            key_prefix: RedisBackend::DEFAULT_KEY_PREFIX.to_owned(),
            node_timeout: Self::DEFAULT_NODE_TIMEOUT,
            connect_timeout: RedisBackend::DEFAULT_CONNECT_TIMEOUT,
            drift_factor: Self::DEFAULT_DRIFT_FACTOR,
        }
    }

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

    /// Runs `operation` on every node at once, each under the node timeout,
    /// and returns as soon as `decided` says the outcome is known (or all
    /// answered). Unanswered nodes are `None` in [`FanOut::answers`]; once the
    /// outcome is decided their operations are not cancelled but finish in
    /// a background task, so
    /// that a grant or renewal reaches every live node, not just the first
    /// majority, and one node failing later does not cost the lock.
    /// [`FanOut::settle`] waits for them.
    async fn fan_out<T, F, Fut>(
        &self,
        key: &str,
        operation: F,
        mut decided: impl FnMut(&Answers<T>) -> bool,
    ) -> FanOut<T>
    where
        T: Send + 'static,
        F: Fn(usize, RedisBackend, Arc<str>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, LockError>> + Send + 'static,
    {
        let key: Arc<str> = Arc::from(key);
        let operation = Arc::new(operation);
        let mut pending: FuturesUnordered<_> = (0..self.inner.nodes.len())
            .map(|index| {
                let (inner, operation, key) =
                    (Arc::clone(&self.inner), Arc::clone(&operation), Arc::clone(&key));
                async move {
                    let node_timeout = inner.node_timeout;
                    let answer = timeout(node_timeout, async {
                        let backend = inner.nodes[index].backend().await?;
                        operation(index, backend, Arc::clone(&key)).await
                    })
                    .await
                    .unwrap_or_else(|_| {
                        Err(LockError::unavailable(
                            Some(&key),
                            format!("no answer within the node timeout of {node_timeout:?}"),
                        ))
                    });
                    (index, answer)
                }
            })
            .collect();
        let mut answers: Answers<T> = self.inner.nodes.iter().map(|_| None).collect();
        while let Some((index, answer)) = pending.next().await {
            answers[index] = Some(answer);
            if decided(&answers) {
                break;
            }
        }
        let (sender, rest) = mpsc::unbounded_channel();
        if !pending.is_empty() {
            // One task for the stragglers, spawned only when there are some.
            tokio::spawn(async move {
                while let Some(answer) = pending.next().await {
                    // The caller may have stopped listening: then nobody needs it.
                    let _ = sender.send(answer);
                }
            });
        }
        FanOut { answers, rest }
    }

    /// [`fan_out`](Self::fan_out) that waits for every node's answer.
    async fn fan_out_all<T, F, Fut>(&self, key: &str, operation: F) -> Answers<T>
    where
        T: Send + 'static,
        F: Fn(usize, RedisBackend, Arc<str>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, LockError>> + Send + 'static,
    {
        self.fan_out(key, operation, |_| false).await.answers
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

fn count<T>(answers: &[Option<Result<T, LockError>>], test: impl Fn(&T) -> bool) -> usize {
    answers
        .iter()
        .filter(|answer| matches!(answer, Some(Ok(value)) if test(value)))
        .count()
}

/// `(node index, fencing counter)` of every node that granted.
fn granted_tokens(answers: &Answers<NodeGrant>) -> Vec<(usize, u64)> {
    answers
        .iter()
        .enumerate()
        .filter_map(|(index, answer)| match answer {
            Some(Ok(NodeGrant::Granted(token))) => Some((index, *token)),
            _ => None,
        })
        .collect()
}

/// One answer per node, `None` while a node has not answered.
type Answers<T> = Vec<Option<Result<T, LockError>>>;

/// What a [`fan_out`](RedlockBackend::fan_out) heard by the time the
/// outcome was decided.
struct FanOut<T> {
    answers: Answers<T>,
    rest: mpsc::UnboundedReceiver<(usize, Result<T, LockError>)>,
}

impl<T> FanOut<T> {
    /// Waits for the nodes that had not answered yet (each bounded by the
    /// node timeout) and returns every answer.
    async fn settle(mut self) -> Answers<T> {
        while let Some((index, answer)) = self.rest.recv().await {
            self.answers[index] = Some(answer);
        }
        self.answers
    }
}

fn failed<T>(answers: &[Option<Result<T, LockError>>]) -> usize {
    answers
        .iter()
        .filter(|answer| matches!(answer, Some(Err(_))))
        .count()
}

impl RedlockBackendBuilder {
    /// Prefix of every key and channel on every node (default `dlock:`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Limit for one node's answer to one command (default 100 ms). Keep
    /// it small next to the TTL: an acquisition never waits longer than
    /// this for a slow node.
    pub fn node_timeout(mut self, limit: Duration) -> Self {
        self.node_timeout = limit;
        self
    }

    /// Limit for connecting to the nodes at start (default 5 s).
    pub fn connect_timeout(mut self, limit: Duration) -> Self {
        self.connect_timeout = limit;
        self
    }

    /// Clock drift factor (default 0.01): the validity of a grant is
    /// `ttl − elapsed − (factor · ttl + 2 ms)`. From 0 to 0.5.
    pub fn drift_factor(mut self, factor: f64) -> Self {
        self.drift_factor = factor;
        self
    }

    /// Connects to every node at once; fails with
    /// [`LockError::InvalidOptions`] for bad settings or URLs (duplicates
    /// included) and [`LockError::Unavailable`] (naming each failed node)
    /// when fewer than a majority answer.
    pub async fn connect(self) -> Result<RedlockBackend, LockError> {
        let invalid = |reason: String| LockError::invalid_options(None, reason);
        if let Some(reason) = &self.invalid {
            return Err(invalid(reason.clone()));
        }
        if self.urls.is_empty() {
            return Err(invalid(
                "no Redlock nodes given; pass the URLs of N independent masters (5 is usual)".into(),
            ));
        }
        let mut seen = self.urls.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.urls.len() {
            return Err(invalid(
                "a Redlock node is listed twice; each URL must name a different master".into(),
            ));
        }
        if !(0.0..0.5).contains(&self.drift_factor) {
            return Err(invalid(format!(
                "drift factor {} is out of range; use 0 to 0.5 (default 0.01)",
                self.drift_factor
            )));
        }
        validate_timeout("node timeout", self.node_timeout, Duration::from_secs(60))?;
        let nodes: Vec<Node> = self
            .urls
            .iter()
            .map(|url| {
                let builder = RedisBackend::builder(url)
                    .key_prefix(self.key_prefix.clone())
                    .command_timeout(self.node_timeout)
                    .connect_timeout(self.connect_timeout);
                Node::new(redact_url(url), builder)
            })
            .collect();
        let quorum = nodes.len() / 2 + 1;
        let connected: Vec<Result<(), LockError>> =
            futures_util::future::join_all(nodes.iter().map(|node| async move { node.connect().await }))
                .await;
        let mut failures = Vec::new();
        for (node, outcome) in nodes.iter().zip(connected) {
            match outcome {
                // A bad URL or setting: report it as such, not as a node failure.
                Err(error @ LockError::InvalidOptions { .. }) => return Err(error),
                Err(error) => failures.push(format!("{}: {error}", node.address)),
                Ok(()) => {}
            }
        }
        if nodes.len() - failures.len() < quorum {
            return Err(LockError::unavailable(
                None,
                format!(
                    "only {} of {} Redlock nodes answered, a majority ({quorum}) is needed; {}",
                    nodes.len() - failures.len(),
                    nodes.len(),
                    failures.join("; ")
                ),
            ));
        }
        for failure in &failures {
            debug!(%failure, "a Redlock node is down at start; it is retried on use");
        }
        same_server_twice(&nodes).await?;
        Ok(RedlockBackend {
            inner: Arc::new(Redlock {
                nodes,
                quorum,
                node_timeout: self.node_timeout,
                drift_factor: self.drift_factor,
            }),
        })
    }
}

/// Fails when two of the connected nodes are one Redis process (the same
/// `run_id`), however differently their URLs spell it (`localhost` and
/// `127.0.0.1`, another database number): such a "majority" is one server.
async fn same_server_twice(nodes: &[Node]) -> Result<(), LockError> {
    let live: Vec<Option<RedisBackend>> = nodes
        .iter()
        .map(|node| match &*node.state.borrow() {
            NodeState::Live(backend) => Some(backend.clone()),
            _ => None,
        })
        .collect();
    let mut seen: Vec<(String, &str)> = Vec::new();
    for (node, backend) in nodes.iter().zip(live) {
        let Some(backend) = backend else { continue };
        let Some(run_id) = backend.server_run_id().await? else {
            continue;
        };
        if let Some((_, first)) = seen.iter().find(|(id, _)| *id == run_id) {
            return Err(LockError::invalid_options(
                None,
                format!(
                    "{first} and {} are the same Redis server (run_id {run_id}); each Redlock node must be a different master",
                    node.address
                ),
            ));
        }
        seen.push((run_id, &node.address));
    }
    Ok(())
}

#[async_trait]
impl LockBackend for RedlockBackend {
    async fn try_acquire(&self, request: &AcquireRequest<'_>) -> Result<Attempt, LockError> {
        request.require_exclusive()?;
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
                    async move { node.acquire_once(&key, &owner, ttl).await }
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
                    async move { node.extend_once(&key, &owner, ttl).await }
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

impl fmt::Debug for RedlockBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.urls.iter().map(|url| redact_url(url)).collect();
        f.debug_struct("RedlockBackendBuilder")
            .field("nodes", &nodes)
            .field("key_prefix", &self.key_prefix)
            .field("node_timeout", &self.node_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("drift_factor", &self.drift_factor)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::RedlockBackend;

    #[test]
    fn one_redlock_url_names_every_node() {
        let builder = RedlockBackend::builder(["redlock://:pw@h1:6379,h2:6379,h3:6379"]);
        assert_eq!(
            builder.urls,
            [
                "redis://:pw@h1:6379",
                "redis://:pw@h2:6379",
                "redis://:pw@h3:6379"
            ]
        );
        assert!(builder.invalid.is_none());
        assert!(RedlockBackend::builder(["redlock://h1"]).invalid.is_some());
        let listed = RedlockBackend::builder(["redis://h1:1", "redis://h2:2"]);
        assert_eq!(listed.urls, ["redis://h1:1", "redis://h2:2"]);
    }
}
