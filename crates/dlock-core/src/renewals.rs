//! The renewal schedule: one task per locker keeps every guard's lease alive.
//!
//! A guard is an entry in a deadline-ordered map, not a task of its own:
//! taking and giving back a lock then costs two map operations instead of
//! spawning, waking and cancelling a task, which matters on the hot path
//! (a cycle is a few microseconds of client work). The driver task sleeps
//! until the earliest deadline and starts the renewals that are due side
//! by side, so renewals falling due together share the connection's writes.
//!
//! Each runtime a locker is used on gets a schedule and a driver of its
//! own ([`RenewalsByRuntime`]): a guard is renewed on the runtime it was
//! taken on, so a locker shared across runtimes keeps renewing on every
//! healthy one when another stalls or shuts down.
//!
//! A driver runs while its schedule lives; it is started by the first
//! guard, and started again by the next one if it has ended.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::Instrument;

/// What the schedule holds: something to look at when its time comes (a
/// guard's renewal or loss check). The schedule knows nothing else of
/// guards, and holds them weakly: a guard dropped meanwhile is skipped.
pub(crate) trait Due: Send + Sync + 'static {
    /// The work due now; it runs as a task of its own.
    fn on_deadline(self: Arc<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// A locker's renewal schedules, one per Tokio runtime it is used on.
#[derive(Default)]
pub(crate) struct RenewalsByRuntime {
    /// Few runtimes use one locker (usually one): a list beats a map.
    schedules: Mutex<Vec<(tokio::runtime::Id, Arc<Renewals>)>>,
}

impl RenewalsByRuntime {
    /// The schedule of the runtime this is called on (needs one).
    pub(crate) fn for_current_runtime(&self) -> Arc<Renewals> {
        let runtime = tokio::runtime::Handle::current().id();
        let mut schedules = self.schedules.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, renewals)) = schedules.iter().find(|(id, _)| *id == runtime) {
            return Arc::clone(renewals);
        }
        // Runtimes that were shut down have nothing left to renew.
        schedules.retain(|(_, renewals)| !renewals.driver_ended());
        let renewals = Arc::new(Renewals::default());
        schedules.push((runtime, Arc::clone(&renewals)));
        renewals
    }
}

/// The deadlines of the guards one locker handed out on one runtime, and
/// their driver task.
pub(crate) struct Renewals {
    schedule: Mutex<Schedule>,
    /// Wakes the driver when a deadline earlier than its timer arrives, or
    /// when this schedule is dropped.
    wake: Arc<Notify>,
    /// The last entry id handed out; an atomic, so that a new guard does
    /// not take the schedule's lock twice.
    last_id: AtomicU64,
}

#[derive(Default)]
struct Schedule {
    due: BTreeMap<(Instant, u64), Weak<dyn Due>>,
    deadline_of: HashMap<u64, Instant>,
    /// When the driver looks at `due` next; `None` while it waits for a wake-up only.
    driver_wakes_at: Option<Instant>,
    driver: Option<JoinHandle<()>>,
}

impl Default for Renewals {
    fn default() -> Self {
        Renewals {
            schedule: Mutex::new(Schedule::default()),
            wake: Arc::new(Notify::new()),
            last_id: AtomicU64::new(0),
        }
    }
}

impl Drop for Renewals {
    fn drop(&mut self) {
        // The driver holds only a weak reference; let it see that it is done.
        self.wake.notify_one();
    }
}

impl Renewals {
    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a driver was started and has ended (its runtime is gone).
    fn driver_ended(&self) -> bool {
        self.schedule()
            .driver
            .as_ref()
            .is_some_and(JoinHandle::is_finished)
    }

    /// A fresh id for a guard's entry.
    pub(crate) fn next_id(&self) -> u64 {
        self.last_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Asks for `guard` (entry `id`) to be looked at `at`: renewed, or
    /// (without auto-renewal) checked for running out. Needs a Tokio runtime.
    pub(crate) fn schedule_at(self: &Arc<Self>, id: u64, at: Instant, guard: Weak<dyn Due>) {
        let mut schedule = self.schedule();
        if let Some(previous) = schedule.deadline_of.insert(id, at) {
            schedule.due.remove(&(previous, id));
        }
        schedule.due.insert((at, id), guard);
        let running = schedule
            .driver
            .as_ref()
            .is_some_and(|driver| !driver.is_finished());
        if !running {
            let span = tracing::info_span!("dlock.renewals");
            let driver = drive(Arc::downgrade(self), Arc::clone(&self.wake)).instrument(span);
            schedule.driver = Some(tokio::spawn(driver));
            schedule.driver_wakes_at = Some(at);
        } else if schedule.driver_wakes_at.is_none_or(|wakes_at| at < wakes_at) {
            schedule.driver_wakes_at = Some(at);
            self.wake.notify_one();
        }
    }

    /// Takes entry `id` off the schedule (the guard was released, forgotten,
    /// dropped or lost).
    pub(crate) fn cancel(&self, id: u64) {
        let mut schedule = self.schedule();
        if let Some(at) = schedule.deadline_of.remove(&id) {
            schedule.due.remove(&(at, id));
        }
    }

    /// Removes and returns the entries due by `now`; records when the driver
    /// looks next.
    fn take_due(&self, now: Instant) -> (Vec<Weak<dyn Due>>, Option<Instant>) {
        let mut schedule = self.schedule();
        let mut due = Vec::new();
        while let Some(entry) = schedule.due.first_entry() {
            let (at, id) = *entry.key();
            if at > now {
                break;
            }
            due.push(entry.remove());
            schedule.deadline_of.remove(&id);
        }
        let next = schedule.due.first_key_value().map(|((at, _), _)| *at);
        schedule.driver_wakes_at = next;
        (due, next)
    }
}

/// The driver: sleeps until the earliest deadline (or a wake-up), then
/// starts the work that is due. Ends when the schedule is gone.
async fn drive(renewals: Weak<Renewals>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(renewals) = renewals.upgrade() else {
                return;
            };
            let (due, next) = renewals.take_due(Instant::now());
            for guard in due.iter().filter_map(Weak::upgrade) {
                // Each renewal may retry for a while (a failover); they run
                // side by side, so one slow key holds up no other.
                tokio::spawn(guard.on_deadline());
            }
            next
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = wake.notified() => {}
                    () = sleep_until(at) => {}
                }
            }
            None => wake.notified().await,
        }
    }
}
