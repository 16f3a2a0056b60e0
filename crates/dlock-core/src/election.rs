//! Leader election: `Election`, its `Campaign` request, the `Leadership`
//! a won campaign gives, and the `Observation` stream of leaders.
//!
//! A leadership is a lease of the kind [`LockKind::Election`] taken with
//! the same request (`LockRequest`) and held by the same guard
//! (`LockGuard`) as every lock: renewal, loss signal, fencing token (the
//! term), cancel-safe waiting and clean-up all come from there. What
//! elections add is the public value, which the backend keeps with the
//! lease, and observation, which re-reads the leader on each notification
//! of the key and when the reported leader's lease ends.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use crate::backend::{LockBackend, LockKind};
use crate::backoff::Backoff;
use crate::error::LockError;
use crate::guard::LockGuard;
use crate::leader::Leader;
use crate::locker::Locker;
use crate::notify::ReleaseEvents;
use crate::options::{validate_key, validate_value};
use crate::request::LockRequest;
use crate::token::FencingToken;

/// A leader election on one key of a [`Locker`]'s backend; cheap to clone.
///
/// At most one candidate leads at a time. The leader's lease is a lock of
/// its own kind: it is renewed in the background, it ends when the leader
/// resigns or dies (after its TTL), and its fencing token is the leader's
/// *term*, greater than every term before it. Pass the term with every
/// write the leader makes, and have the resource refuse writes with an
/// older term: a leader that paused past its TTL is then fenced off.
///
/// ```
/// use dlock_core::{LockError, Locker};
/// use dlock_testkit::MemoryBackend;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), LockError> {
/// let locker = Locker::new(MemoryBackend::new());
/// let election = locker.election("scheduler");
///
/// let leadership = election.campaign("node-a:8080").await?; // waits until elected
/// let leader = election.leader().await?.expect("someone leads");
/// assert_eq!(leader.value, "node-a:8080");
/// assert_eq!(leader.term, leadership.term());
///
/// leadership.proclaim("node-a:9090").await?; // a new value, the same term
/// assert_eq!(election.leader().await?.map(|l| l.value).as_deref(), Some("node-a:9090"));
///
/// leadership.resign().await?;
/// assert_eq!(election.leader().await?, None);
/// # Ok(()) }
/// ```
///
/// A key used for an election is used for nothing else: a lock, read lock
/// or semaphore on it is [`LockError::WrongKind`], and so is a campaign on
/// their keys. Redlock answers [`LockError::Unsupported`].
#[derive(Clone)]
pub struct Election {
    locker: Locker,
    key: String,
}

impl Election {
    pub(crate) fn new(locker: Locker, key: String) -> Self {
        Election { locker, key }
    }

    /// The election's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// A campaign to lead with `value` (public while this candidate leads:
    /// [`leader`](Self::leader) and [`observe`](Self::observe) show it).
    /// Set options on it, then `.await` it: it waits until elected, or use
    /// [`try_campaign`](Campaign::try_campaign) for one attempt.
    ///
    /// Candidates wait for notifications of the key, not by polling, and
    /// take over in arrival order on backends that keep a line (memory,
    /// etcd). Dropping the future while it waits leaves nothing behind.
    /// `value` must be at most [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN) bytes.
    pub fn campaign(&self, value: impl Into<String>) -> Campaign {
        Campaign {
            request: LockRequest {
                kind: LockKind::Election,
                value: Some(value.into()),
                ..self.locker.lock(self.key.clone())
            },
        }
    }

    /// The current leader, or `None` when nobody leads (a leader whose
    /// lease ended is not reported).
    pub async fn leader(&self) -> Result<Option<Leader>, LockError> {
        validate_key(&self.key)?;
        let state = self.locker.backend().leader(&self.key).await?;
        Ok(state.map(|state| state.leader))
    }

    /// A stream of the election's leaders: the current one first (`None`
    /// when nobody leads), then every change, in order and never twice in a
    /// row: a new leader, a proclaimed value, and `None` when the leader
    /// resigns or its lease ends with no successor.
    ///
    /// It is driven by the backend's notifications of the key, and reads
    /// the leader again when the reported leader's lease is due to end, so
    /// a leader that died is not reported for longer than its lease plus a
    /// round trip. A restart or failover of the backend is ridden out: the
    /// stream re-reads and yields the truth. An `Err` is yielded (once per
    /// outage) only when the backend stays unreachable for
    /// [`Observation::OUTAGE_GRACE`], or when the reported leader's lease
    /// has ended meanwhile; the stream then goes on trying. Any other
    /// error (an invalid key, a key in use as a lock) is yielded and ends
    /// the stream. Drop it to stop.
    ///
    /// ```
    /// use futures_util::StreamExt;
    /// # use dlock_core::{LockError, Locker};
    /// # use dlock_testkit::MemoryBackend;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), LockError> {
    /// # let locker = Locker::new(MemoryBackend::new());
    /// let election = locker.election("scheduler");
    /// let mut leaders = election.observe();
    /// assert_eq!(leaders.next().await.transpose()?, Some(None)); // nobody leads yet
    ///
    /// let leadership = election.campaign("node-a").await?;
    /// let leader = leaders.next().await.transpose()?.flatten();
    /// assert_eq!(leader.map(|l| l.value).as_deref(), Some("node-a"));
    ///
    /// leadership.resign().await?;
    /// assert_eq!(leaders.next().await.transpose()?, Some(None));
    /// # Ok(()) }
    /// ```
    pub fn observe(&self) -> Observation {
        Observation::new(Arc::clone(self.locker.backend()), self.key.clone())
    }
}

impl fmt::Debug for Election {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Election").field("key", &self.key).finish()
    }
}

/// A campaign being built; `.await` it to wait until elected.
///
/// Options as for a lock: `.ttl()` (default 30 s; how long a leader that
/// died keeps the election), `.wait()` (default: without limit),
/// `.auto_renew()` (default true). The future is cancel-safe.
#[must_use = "a Campaign does nothing until it is awaited"]
pub struct Campaign {
    request: LockRequest,
}

impl Campaign {
    /// The leadership's lease length; see [`LockRequest::ttl`].
    pub fn ttl(self, ttl: Duration) -> Self {
        Campaign {
            request: self.request.ttl(ttl),
        }
    }

    /// Gives up with [`LockError::Timeout`] after waiting this long; see
    /// [`LockRequest::wait`].
    pub fn wait(self, wait: Duration) -> Self {
        Campaign {
            request: self.request.wait(wait),
        }
    }

    /// Whether the leadership's lease is renewed in the background
    /// (default true); see [`LockRequest::auto_renew`].
    pub fn auto_renew(self, auto_renew: bool) -> Self {
        Campaign {
            request: self.request.auto_renew(auto_renew),
        }
    }

    /// One attempt: the leadership, or [`LockError::Contended`] at once
    /// when someone else leads.
    pub async fn try_campaign(self) -> Result<Leadership, LockError> {
        let value = self.checked_value()?;
        let guard = self.request.try_lock().await?;
        Ok(Leadership::new(guard, value))
    }

    fn checked_value(&self) -> Result<String, LockError> {
        let value = self.request.value.clone().unwrap_or_default();
        validate_value(&self.request.key, &value)?;
        Ok(value)
    }
}

impl IntoFuture for Campaign {
    type Output = Result<Leadership, LockError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let value = self.checked_value()?;
            let guard = self.request.await?;
            Ok(Leadership::new(guard, value))
        })
    }
}

impl fmt::Debug for Campaign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Campaign")
            .field("request", &self.request)
            .finish()
    }
}

/// A won campaign: this candidate leads until it resigns, is dropped, or
/// loses its lease.
///
/// Like a [`LockGuard`] (which it holds): renewed in the background,
/// [`is_held`](Self::is_held) and [`lost`](Self::lost) tell when the lease
/// is gone, dropping it resigns in the background, and
/// [`forget`](Self::forget) stops renewing as if the process had died.
#[must_use = "dropping a Leadership resigns at once; keep it for as long as you lead"]
pub struct Leadership {
    guard: LockGuard,
    /// The value campaigned with or last proclaimed.
    value: std::sync::Mutex<String>,
    /// Held across a proclamation, so that concurrent ones run one after
    /// the other and `value` ends as the server has it.
    proclaiming: tokio::sync::Mutex<()>,
}

impl Leadership {
    fn new(guard: LockGuard, value: String) -> Self {
        Leadership {
            guard,
            value: std::sync::Mutex::new(value),
            proclaiming: tokio::sync::Mutex::new(()),
        }
    }

    /// The election's key.
    pub fn key(&self) -> &str {
        self.guard.key()
    }

    /// This leadership's term: its lease's fencing token, greater than
    /// every term before it in the election. Send it with every write made
    /// as leader.
    pub fn term(&self) -> FencingToken {
        self.guard.fencing_token()
    }

    /// The value this leader campaigned with or last proclaimed.
    pub fn value(&self) -> String {
        self.value.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// True while this candidate leads as far as this process can know;
    /// see [`LockGuard::is_held`].
    pub fn is_held(&self) -> bool {
        self.guard.is_held()
    }

    /// Resolves when the leadership is known to be lost; see
    /// [`LockGuard::lost`].
    pub async fn lost(&self) {
        self.guard.lost().await;
    }

    /// Changes the public value, if this candidate still leads; the term
    /// stays. Fails with [`LockError::NotHeld`] (and the leadership turns
    /// lost) when another candidate leads or the lease ended, and with
    /// [`LockError::Lost`] when it was known lost already. `value` must be
    /// at most [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN) bytes.
    pub async fn proclaim(&self, value: impl Into<String>) -> Result<(), LockError> {
        let value = value.into();
        validate_value(self.key(), &value)?;
        let _one_at_a_time = self.proclaiming.lock().await;
        self.guard.proclaim(&value).await?;
        *self.value.lock().unwrap_or_else(PoisonError::into_inner) = value;
        Ok(())
    }

    /// Resigns: ends the lease, so the next candidate leads. Fails with
    /// [`LockError::NotHeld`] when the leadership had ended already.
    pub async fn resign(self) -> Result<(), LockError> {
        self.guard.release().await
    }

    /// Stops renewing without resigning, as if this process had died: the
    /// lease ends after its TTL.
    pub fn forget(self) {
        self.guard.forget();
    }

    /// The lease behind this leadership, as a lock guard (to
    /// [`extend`](LockGuard::extend) it, for instance).
    pub fn guard(&self) -> &LockGuard {
        &self.guard
    }
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("key", &self.key())
            .field("term", &self.term())
            .field("value", &self.value())
            .field("held", &self.is_held())
            .finish()
    }
}

/// The stream [`Election::observe`] returns: `Result<Option<Leader>,
/// LockError>` items. Dropping it stops observing.
#[must_use = "streams do nothing unless polled"]
pub struct Observation {
    next: Option<Step>,
}

/// One item's worth of observing: the item, and the observer for the next.
type Step = Pin<Box<dyn Future<Output = (Result<Option<Leader>, LockError>, Observer)> + Send>>;

impl Observation {
    /// How long the backend may stay unreachable before the stream yields
    /// an `Err`: a server restart or a failover is usually over sooner.
    pub const OUTAGE_GRACE: Duration = Duration::from_secs(5);

    /// The longest time between two reads of the leader, whatever the
    /// notifications say: a safety net for a notification lost while the
    /// backend's notification channel reconnected.
    pub const RECHECK: Duration = Duration::from_secs(10);

    fn new(backend: Arc<dyn LockBackend>, key: String) -> Self {
        let observer = Observer {
            backend,
            key,
            events: None,
            last: None,
            lease_ends: None,
            failing_since: None,
            outage_reported: false,
            read_now: true,
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
        };
        Observation {
            next: Some(Box::pin(observer.step())),
        }
    }
}

impl Stream for Observation {
    type Item = Result<Option<Leader>, LockError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(next) = self.next.as_mut() else {
            return Poll::Ready(None);
        };
        match next.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready((item, observer)) => {
                // Only an unreachable backend may come back; anything else
                // (an invalid key, a key of another kind) ends the stream
                // after saying so.
                self.next = match &item {
                    Err(error) if !matches!(error, LockError::Unavailable { .. }) => None,
                    _ => Some(Box::pin(observer.step())),
                };
                Poll::Ready(Some(item))
            }
        }
    }
}

impl fmt::Debug for Observation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observation").finish_non_exhaustive()
    }
}

/// The state an observation carries from one item to the next.
struct Observer {
    backend: Arc<dyn LockBackend>,
    key: String,
    events: Option<ReleaseEvents>,
    /// The last item yielded (`None` before the first).
    last: Option<Option<Leader>>,
    /// When the reported leader's lease is due to end, as last read.
    lease_ends: Option<Instant>,
    /// Since when reads have failed, if the last one did.
    failing_since: Option<Instant>,
    /// Whether the current outage was reported with an `Err`.
    outage_reported: bool,
    /// Whether to read at once rather than wait for a change first.
    read_now: bool,
    backoff: Backoff,
}

impl Observer {
    /// Runs until the next item, and hands itself back with it.
    async fn step(mut self) -> (Result<Option<Leader>, LockError>, Observer) {
        let item = self.next_item().await;
        (item, self)
    }

    async fn next_item(&mut self) -> Result<Option<Leader>, LockError> {
        validate_key(&self.key)?;
        loop {
            if !self.read_now {
                self.wait_for_change().await;
            }
            self.read_now = false;
            if self.events.is_none() {
                match self.backend.subscribe(&self.key).await {
                    Ok(events) => self.events = Some(events),
                    Err(error) => {
                        self.failed(error)?;
                        continue;
                    }
                }
            }
            let began = Instant::now();
            let state = match self.backend.leader(&self.key).await {
                Ok(state) => state,
                Err(error) => {
                    self.failed(error)?;
                    continue;
                }
            };
            let recovered = self.failing_since.take().is_some();
            self.backoff.reset();
            self.lease_ends = state
                .as_ref()
                .and_then(|state| state.remaining)
                .map(|remaining| began + remaining);
            let leader = state.map(|state| state.leader);
            // After an outage was reported the truth is told again, even
            // when it did not change: the `Err` broke the sequence.
            let reported_outage = std::mem::take(&mut self.outage_reported);
            if self.last.as_ref() != Some(&leader) || (recovered && reported_outage) {
                self.last = Some(leader.clone());
                return Ok(leader);
            }
        }
    }

    /// A read failed: the error ends the item when the outage has lasted
    /// [`Observation::OUTAGE_GRACE`], or when the reported leader's lease
    /// ended meanwhile (once per outage); else the next read waits a
    /// backoff pause.
    fn failed(&mut self, error: LockError) -> Result<(), LockError> {
        if !matches!(error, LockError::Unavailable { .. }) {
            return Err(error);
        }
        let now = Instant::now();
        let since = *self.failing_since.get_or_insert(now);
        // The subscription may be what broke: open a new one with the next read.
        self.events = None;
        let leader_may_be_gone = self.lease_ends.is_some_and(|ends| ends <= now);
        if !self.outage_reported && (now - since >= Observation::OUTAGE_GRACE || leader_may_be_gone) {
            self.outage_reported = true;
            self.read_now = true;
            return Err(error);
        }
        debug!(key = %self.key, %error, "observing an election: the backend is unreachable; trying again");
        Ok(())
    }

    /// Sleeps until the key's next notification, the reported leader's
    /// lease end, or the safety re-check, whichever is first; while reads
    /// fail, until the next backoff pause ends.
    async fn wait_for_change(&mut self) {
        let now = Instant::now();
        if self.failing_since.is_some() {
            sleep_until(now + self.backoff.next_delay()).await;
            return;
        }
        let mut wake_at = now + Observation::RECHECK;
        if let Some(ends) = self.lease_ends {
            // A moment after the end, so that the read finds it over.
            wake_at = wake_at.min(ends + Duration::from_millis(1));
        }
        let Some(events) = self.events.as_mut() else {
            sleep_until(wake_at).await;
            return;
        };
        tokio::select! {
            notified = events.recv() => {
                if !notified {
                    // The source closed: subscribe again with the next read.
                    self.events = None;
                }
            }
            () = sleep_until(wake_at) => {}
        }
    }
}
