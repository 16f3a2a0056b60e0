//! The guard of a held lock, and how it is kept alive (with `renewals`).

use std::fmt;
use std::future::{Future, pending};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout_at};
use tracing::{Instrument, debug, info_span, warn};

use crate::backend::{ExtendOutcome, Grant, Lease, LockBackend, LockKind, ProclaimOutcome, ReleaseOutcome};
use crate::background::Background;
use crate::backoff::Backoff;
use crate::error::{LockError, NotHeldReason};
use crate::options::validate_ttl;
use crate::owner::OwnerToken;
use crate::reads::ReadMark;
use crate::renewals::{Due, Renewals};
use crate::telemetry::{Holding, LossReason, Meter, Operation};
use crate::token::FencingToken;

/// Proof of holding a lock, with the means to keep it and to learn when it is lost.
///
/// While the guard lives, its locker renews the lease every `ttl / 3`
/// (unless the request said `.auto_renew(false)`), each time checking that
/// the lock is still ours. The guard turns *lost* when a renewal finds
/// another owner or no lease, when renewals keep failing until the lease's
/// local validity runs out, or (without auto-renewal) when the TTL runs out.
/// Then [`is_held`](Self::is_held) is false and [`lost`](Self::lost)
/// resolves.
///
/// Give the lock back with [`release`](Self::release). A guard dropped
/// without it releases in the background when a Tokio runtime is running;
/// otherwise the lease simply runs out after its TTL.
///
/// ```
/// use std::time::Duration;
/// use dlock_core::Locker;
/// use dlock_testkit::MemoryBackend;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), dlock_core::LockError> {
/// let locker = Locker::new(MemoryBackend::new());
/// let guard = locker.lock("orders/42").ttl(Duration::from_secs(10)).await?;
/// assert_eq!(guard.key(), "orders/42");
/// assert!(guard.is_held());
/// let token = guard.fencing_token(); // send it with every write
/// assert!(token.get() > 0);
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[must_use = "dropping a LockGuard releases the lock at once; keep it for as long as you need the lock"]
pub struct LockGuard {
    shared: Arc<GuardShared>,
    /// The task that waits for the backend's loss signal, if it gave one.
    loss_watch: Option<AbortHandle>,
    finished: bool,
    /// A read guard's entry in its locker's held reads, for as long as it lives.
    _reading: Option<ReadMark>,
}

pub(crate) struct GuardShared {
    backend: Arc<dyn LockBackend>,
    lease: Lease,
    auto_renew: bool,
    state: watch::Sender<GuardState>,
    /// The locker's renewal schedule, and this guard's entry in it.
    renewals: Arc<Renewals>,
    entry: u64,
    /// Where a dropped guard's release runs.
    background: Arc<Background>,
    /// The guard's metrics, and its count among the held locks.
    holding: Holding,
}

#[derive(Debug, Clone, Copy)]
struct GuardState {
    /// The lease length asked for at the last extension.
    ttl: Duration,
    /// Until when the lease is certain to last, on the local monotonic clock.
    valid_until: Instant,
    /// When the call that set `valid_until` began; a slower, older call must
    /// not overwrite a newer one's answer.
    measured_from: Instant,
    lost: bool,
}

/// What [`LockGuard::start`] needs from the acquisition.
pub(crate) struct Acquired {
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) key: String,
    pub(crate) owner: OwnerToken,
    pub(crate) ttl: Duration,
    pub(crate) auto_renew: bool,
    pub(crate) kind: LockKind,
    pub(crate) started: Instant,
    pub(crate) grant: Grant,
    pub(crate) renewals: Arc<Renewals>,
    pub(crate) background: Arc<Background>,
    pub(crate) reading: Option<ReadMark>,
    pub(crate) meter: Meter,
}

impl LockGuard {
    pub(crate) fn start(acquired: Acquired) -> LockGuard {
        let Acquired {
            backend,
            key,
            owner,
            ttl,
            auto_renew,
            kind,
            started,
            grant,
            renewals,
            background,
            reading,
            meter,
        } = acquired;
        let Grant {
            token,
            validity,
            handle,
            loss_signal,
            ..
        } = grant;
        let state = GuardState {
            ttl,
            valid_until: valid_until(started, validity, ttl),
            measured_from: started,
            lost: false,
        };
        let entry = renewals.next_id();
        let shared = Arc::new(GuardShared {
            backend,
            lease: Lease::new(key, owner, token, kind, handle),
            auto_renew,
            state: watch::Sender::new(state),
            renewals,
            entry,
            background,
            holding: meter.holding(),
        });
        shared.schedule_next();
        let loss_watch = loss_signal.map(|signal| {
            let span = info_span!("dlock.loss_watch", key = %shared.lease.key(), token = %token);
            // Weak: an aborted task's future is dropped later, on whichever
            // worker runs it next, and a strong reference would keep the
            // lease (and what the backend keeps in it) past the guard's end.
            let watched = Arc::downgrade(&shared);
            let watch = async move {
                signal.await;
                if let Some(watched) = watched.upgrade() {
                    watched.mark_lost(LossReason::Expired, "the backend reported the lease gone");
                }
            };
            tokio::spawn(watch.instrument(span)).abort_handle()
        });
        LockGuard {
            shared,
            loss_watch,
            finished: false,
            _reading: reading,
        }
    }

    /// The key this guard holds.
    pub fn key(&self) -> &str {
        self.shared.lease.key()
    }

    /// The fencing token of this acquisition; pass it with every write to the
    /// protected resource.
    pub fn fencing_token(&self) -> FencingToken {
        self.shared.lease.token()
    }

    /// True while the lock is held as far as this process can know: no loss
    /// was seen and the lease's local validity has not run out.
    pub fn is_held(&self) -> bool {
        self.shared.is_held()
    }

    /// Resolves when the lock is known to be lost. Never resolves while the
    /// lock is held.
    ///
    /// Race it against the critical section to stop work as soon as the lock
    /// is gone ([`Locker::with_lock`](crate::Locker::with_lock) does that for you).
    ///
    /// It resolves no later than the lease's local validity deadline, even
    /// if no renewal ever reports back (a stalled runtime, a renewal that
    /// hangs): past that instant another client may hold the lock.
    pub async fn lost(&self) {
        let shared = &self.shared;
        let mut states = shared.state.subscribe();
        loop {
            let state = *states.borrow_and_update();
            if state.lost {
                return;
            }
            tokio::select! {
                changed = states.changed() => {
                    // The sender lives in `self.shared`, which outlives this
                    // borrow: it cannot close.
                    if changed.is_err() {
                        pending::<()>().await;
                    }
                }
                () = sleep_until(state.valid_until) => {
                    // A renewal may have moved the deadline just now.
                    if !shared.is_held() {
                        shared.mark_lost(
                            shared.ran_out(),
                            "the lease's local validity ran out before a renewal succeeded",
                        );
                        return;
                    }
                }
            }
        }
    }

    /// Resets the lease to `ttl` from now, if the lock is still ours; later
    /// automatic renewals use the new length and are rescheduled from now
    /// (every `ttl / 3`), and without auto-renewal the guard turns lost when
    /// the new lease ends, even when it is shorter than the old one.
    ///
    /// Fails with [`LockError::Lost`] when the guard is no longer held (see
    /// [`is_held`](Self::is_held)), and with [`LockError::NotHeld`] (marking the guard lost) when the
    /// backend finds it is not ours any more.
    pub async fn extend(&self, ttl: Duration) -> Result<(), LockError> {
        let shared = &self.shared;
        validate_ttl(shared.lease.key(), ttl)?;
        shared.ensure_held("extend")?;
        let span = info_span!("dlock.extend", key = %shared.lease.key(), token = %shared.lease.token(), ttl_ms = ttl.as_millis() as u64);
        async {
            let started = Instant::now();
            let outcome = shared
                .meter()
                .backend_answer(shared.backend.extend(&shared.lease, ttl).await, Operation::Extend);
            match outcome? {
                ExtendOutcome::Extended { validity } => {
                    shared.record_validity(started, validity, ttl);
                    // The next renewal (or, without auto-renewal, the loss
                    // check) follows the new lease, which may be shorter.
                    shared.schedule_next();
                    debug!("extended");
                    Ok(())
                }
                ExtendOutcome::NotHeld(reason) => Err(shared.found_not_held(reason)),
            }
        }
        .instrument(span)
        .await
    }

    /// An election's leader sets its public value, if it still leads
    /// (see [`Leadership::proclaim`](crate::Leadership::proclaim)).
    pub(crate) async fn proclaim(&self, value: &str) -> Result<(), LockError> {
        let shared = &self.shared;
        shared.ensure_held("proclaim")?;
        let span = info_span!("dlock.proclaim", key = %shared.lease.key(), token = %shared.lease.token());
        async {
            let outcome = shared.meter().backend_answer(
                shared.backend.proclaim(&shared.lease, value).await,
                Operation::Proclaim,
            );
            match outcome? {
                ProclaimOutcome::Proclaimed => {
                    debug!("proclaimed");
                    Ok(())
                }
                ProclaimOutcome::NotHeld(reason) => Err(shared.found_not_held(reason)),
            }
        }
        .instrument(span)
        .await
    }

    /// Gives the lock back, if it is still ours.
    ///
    /// Fails with [`LockError::NotHeld`] when the backend finds the lock was
    /// not ours any more (it expired, or another owner holds it): anything
    /// written under it must have been protected by the fencing token. Fails
    /// with [`LockError::Unavailable`] when the backend cannot be reached; the
    /// lease then runs out after its TTL.
    pub async fn release(mut self) -> Result<(), LockError> {
        self.stop_watching();
        self.finished = true;
        self.shared.release().await
    }

    /// Drops the guard without releasing: renewal stops and the lease runs
    /// out by itself after its TTL, as if this process had died.
    pub fn forget(mut self) {
        self.stop_watching();
        self.finished = true;
        self.shared.holding.end();
    }

    /// No more renewals or loss signals for this guard. A renewal already
    /// under way finishes, but finds the guard given up and changes nothing.
    fn stop_watching(&mut self) {
        self.shared.renewals.cancel(self.shared.entry);
        if let Some(loss_watch) = self.loss_watch.take() {
            loss_watch.abort();
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop_watching();
        self.shared.holding.end();
        if self.finished || self.shared.state.borrow().lost {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let shared = Arc::clone(&self.shared);
                self.shared.background.spawn(&runtime, async move {
                    if let Err(error) = shared.release().await {
                        debug!(%error, "background release after drop failed; the lease runs out by its TTL");
                    }
                });
            }
            Err(_) => debug!(
                key = %self.shared.lease.key(),
                "guard dropped outside a Tokio runtime; the lease runs out by its TTL"
            ),
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.key())
            .field("fencing_token", &self.fencing_token())
            .field("held", &self.is_held())
            .finish()
    }
}

impl GuardShared {
    fn meter(&self) -> &Meter {
        self.holding.meter()
    }

    /// Why a lease whose local validity ran out is lost: it expired, or
    /// (with auto-renewal) renewals did not get through in time.
    fn ran_out(&self) -> LossReason {
        if self.auto_renew {
            LossReason::Unreachable
        } else {
            LossReason::Expired
        }
    }

    fn is_held(&self) -> bool {
        let state = self.state.borrow();
        !state.lost && Instant::now() < state.valid_until
    }

    /// Refuses `operation` on a guard that is not held: past the local
    /// validity the lock may have changed hands and back, and a guard never
    /// comes back from lost.
    fn ensure_held(&self, operation: &str) -> Result<(), LockError> {
        if self.is_held() {
            return Ok(());
        }
        self.mark_lost(
            self.ran_out(),
            &format!("{operation} was called after the lease's validity ran out"),
        );
        Err(self.lost_error())
    }

    /// The backend found the lease not ours: the guard turns lost, and
    /// this is the error to return.
    fn found_not_held(&self, reason: NotHeldReason) -> LockError {
        self.mark_lost(loss_reason(reason), &reason.to_string());
        LockError::NotHeld {
            key: self.lease.key().to_owned(),
            token: self.lease.token(),
            reason,
        }
    }

    fn lost_error(&self) -> LockError {
        LockError::Lost {
            key: self.lease.key().to_owned(),
            token: self.lease.token(),
        }
    }

    fn mark_lost(&self, reason: LossReason, why: &str) {
        let newly_lost = self
            .state
            .send_if_modified(|state| !std::mem::replace(&mut state.lost, true));
        if newly_lost {
            warn!(
                key = %self.lease.key(),
                token = %self.lease.token(),
                reason = reason.as_str(),
                why,
                "lock lost"
            );
            self.holding.lost(reason);
        }
    }

    fn record_validity(&self, started: Instant, validity: Duration, ttl: Duration) {
        self.state.send_if_modified(|state| {
            if started < state.measured_from {
                return false;
            }
            state.measured_from = started;
            state.valid_until = valid_until(started, validity, ttl);
            state.ttl = ttl;
            true
        });
    }

    async fn release(&self) -> Result<(), LockError> {
        let span = info_span!("dlock.release", key = %self.lease.key(), token = %self.lease.token());
        async {
            // Whatever the answer, this guard no longer claims the lock, and
            // a renewal still under way must not report it lost. No one can
            // be waiting on `lost()`: that borrows the guard, which releasing
            // consumed; so there is no one to notify.
            self.state.send_if_modified(|state| {
                state.lost = true;
                false
            });
            self.holding.end();
            let outcome = self
                .meter()
                .backend_answer(self.backend.release(&self.lease).await, Operation::Release);
            match outcome? {
                ReleaseOutcome::Released => {
                    self.meter().released();
                    debug!("released");
                    Ok(())
                }
                ReleaseOutcome::NotHeld(reason) => {
                    warn!(%reason, "release found the lock no longer ours");
                    Err(LockError::NotHeld {
                        key: self.lease.key().to_owned(),
                        token: self.lease.token(),
                        reason,
                    })
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// How a backend's "not ours" answer counts among the reasons of loss.
fn loss_reason(reason: NotHeldReason) -> LossReason {
    match reason {
        NotHeldReason::Expired => LossReason::Expired,
        NotHeldReason::OtherOwner => LossReason::Taken,
    }
}

/// The instant until which a lease is certain to last. A backend's validity
/// is never trusted beyond the TTL it was asked for.
fn valid_until(started: Instant, validity: Duration, ttl: Duration) -> Instant {
    started.checked_add(validity.min(ttl)).unwrap_or(started)
}

impl Due for GuardShared {
    fn on_deadline(self: Arc<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(self.look())
    }
}

impl GuardShared {
    /// Puts this guard on the renewal schedule for its next look: a third
    /// of the TTL after the last renewal began (but no later than halfway
    /// to the end of its validity), or, without auto-renewal, the end of
    /// its validity.
    fn schedule_next(self: &Arc<Self>) {
        let state = *self.state.borrow();
        let at = if self.auto_renew {
            let now = Instant::now();
            let regular = state.measured_from + state.ttl / 3;
            let halfway = now + state.valid_until.saturating_duration_since(now) / 2;
            regular.min(halfway)
        } else {
            state.valid_until
        };
        let due: Weak<dyn Due> = Arc::downgrade(self) as Weak<GuardShared>;
        self.renewals.schedule_at(self.entry, at, due);
    }

    /// What the renewal schedule runs when this guard's time comes: renew
    /// (or, without auto-renewal, see whether the lease ran out), then
    /// schedule the next look.
    async fn look(self: Arc<Self>) {
        let state = *self.state.borrow();
        if state.lost {
            return;
        }
        if !self.auto_renew {
            // A manual `extend` may have moved the deadline meanwhile.
            if Instant::now() >= state.valid_until {
                self.mark_lost(LossReason::Expired, "the lease ran out (auto-renewal is off)");
            } else {
                self.schedule_next();
            }
            return;
        }
        if renew(&self).await && !self.state.borrow().lost {
            self.schedule_next();
        }
    }
}

/// One owner-checked renewal, retried on transient errors until the lease's
/// validity runs out. Returns false when the lock is lost.
async fn renew(shared: &GuardShared) -> bool {
    let span = info_span!("dlock.renew", key = %shared.lease.key(), token = %shared.lease.token());
    async {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));
        loop {
            let state = *shared.state.borrow();
            if state.lost {
                return false;
            }
            let started = Instant::now();
            if started >= state.valid_until {
                shared.mark_lost(
                    LossReason::Unreachable,
                    "renewal did not succeed before the lease's validity ran out",
                );
                return false;
            }
            let meter = shared.meter();
            let attempt = async {
                let answer = shared.backend.extend(&shared.lease, state.ttl).await;
                meter.backend_answer(answer, Operation::Renew)
            };
            let outcome = timeout_at(state.valid_until, attempt).await;
            meter.renewal(matches!(outcome, Ok(Ok(ExtendOutcome::Extended { .. }))));
            match outcome {
                Ok(Ok(ExtendOutcome::Extended { validity })) => {
                    shared.record_validity(started, validity, state.ttl);
                    debug!("renewed");
                    return true;
                }
                Ok(Ok(ExtendOutcome::NotHeld(reason))) => {
                    shared.mark_lost(loss_reason(reason), &reason.to_string());
                    return false;
                }
                Ok(Err(error @ LockError::Unavailable { .. })) => {
                    let left = state.valid_until.saturating_duration_since(Instant::now());
                    warn!(%error, left_ms = left.as_millis() as u64, "renewal failed; retrying while the lease is still valid");
                    sleep(backoff.next_delay().min(left)).await;
                }
                Ok(Err(error)) => {
                    shared.mark_lost(LossReason::Unreachable, &error.to_string());
                    return false;
                }
                Err(_elapsed) => {
                    shared.mark_lost(
                        LossReason::Unreachable,
                        "renewal got no answer before the lease's validity ran out",
                    );
                    return false;
                }
            }
        }
    }
    .instrument(span)
    .await
}
