//! The behaviour suite every backend runs, the in-memory one included.
//!
//! Each check is a `pub async fn` taking a [`Harness`]; a backend's tests
//! call them all through [`conformance_tests!`](crate::conformance_tests),
//! which makes one `#[test]` per check. Checks panic with a message on
//! failure. Timing bounds are loose enough for real servers on a busy
//! machine, and exact on the in-memory backend under a paused clock.
//!
//! ```
//! use async_trait::async_trait;
//! use dlock_core::Locker;
//! use dlock_testkit::MemoryBackend;
//! use dlock_testkit::conformance::{self, Harness, SuiteConfig};
//!
//! struct Memory(MemoryBackend);
//!
//! #[async_trait]
//! impl Harness for Memory {
//!     async fn locker(&self) -> Locker { Locker::new(self.0.clone()) }
//!     async fn force_expire(&self, key: &str) { self.0.force_expire(key); }
//!     async fn leftovers(&self, key: &str) -> usize { self.0.leases_on(key) + self.0.waiting_on(key) }
//!     fn config(&self) -> SuiteConfig { SuiteConfig::default() }
//! }
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! conformance::acquire_release(&Memory(MemoryBackend::new())).await;
//! # }
//! ```

use std::time::Duration;

use async_trait::async_trait;
use dlock_core::Locker;
use tokio::time::{Instant, sleep};

mod basics;
mod election;
mod leases;
mod rwlock;
mod semaphore;
mod waiting;

pub use basics::*;
pub use election::*;
pub use leases::*;
pub use rwlock::*;
pub use semaphore::*;
pub use waiting::*;

/// What the suite needs from a backend under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A locker over a new client of the backend (its own connections), as
    /// another process would have.
    async fn locker(&self) -> Locker;

    /// Ends the lease on `key` on the server, as if its holder had paused
    /// past its TTL (for Redis: delete the key).
    async fn force_expire(&self, key: &str);

    /// How many entries the server still keeps for `key` (a lock, queue
    /// entries); 0 means nothing was left behind.
    async fn leftovers(&self, key: &str) -> usize;

    /// Timing and capabilities.
    fn config(&self) -> SuiteConfig;
}

/// Timing and capability flags for a suite run.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SuiteConfig {
    /// A short TTL for expiry and renewal checks (default 1 s). Use the
    /// backend's smallest reliable lease (etcd: whole seconds).
    pub short_ttl: Duration,
    /// How quickly a release must wake a waiter (default 1 s). The holder's
    /// TTL in that check is 30 s, so only a notification can meet it.
    pub wake_bound: Duration,
    /// The backend grants in arrival order (checked when set).
    pub fifo: bool,
    /// The backend offers counting semaphores (default true); when off,
    /// the semaphore checks assert that it refuses them as `Unsupported`.
    pub semaphores: bool,
    /// The backend offers read-write locks (default true); when off, the
    /// read-lock checks assert that it refuses them as `Unsupported`.
    pub read_write: bool,
    /// The backend offers leader elections (default true); when off, the
    /// election checks assert that it refuses them as `Unsupported`.
    pub elections: bool,
    /// Election candidates lead in the order they arrived (default false;
    /// checked when set).
    pub election_fifo: bool,
}

impl Default for SuiteConfig {
    fn default() -> Self {
        SuiteConfig {
            short_ttl: Duration::from_secs(1),
            wake_bound: Duration::from_secs(1),
            fifo: false,
            semaphores: true,
            read_write: true,
            elections: true,
            election_fifo: false,
        }
    }
}

impl SuiteConfig {
    /// Sets the short TTL.
    pub fn short_ttl(mut self, ttl: Duration) -> Self {
        self.short_ttl = ttl;
        self
    }

    /// Sets the wake-up bound.
    pub fn wake_bound(mut self, bound: Duration) -> Self {
        self.wake_bound = bound;
        self
    }

    /// Sets the FIFO flag.
    pub fn fifo(mut self, fifo: bool) -> Self {
        self.fifo = fifo;
        self
    }

    /// Sets whether the backend offers semaphores.
    pub fn semaphores(mut self, semaphores: bool) -> Self {
        self.semaphores = semaphores;
        self
    }

    /// Sets whether the backend offers leader elections.
    pub fn elections(mut self, elections: bool) -> Self {
        self.elections = elections;
        self
    }

    /// Sets whether election candidates lead in arrival order.
    pub fn election_fifo(mut self, in_order: bool) -> Self {
        self.election_fifo = in_order;
        self
    }

    /// Sets whether the backend offers read-write locks.
    pub fn read_write(mut self, read_write: bool) -> Self {
        self.read_write = read_write;
        self
    }
}

const LONG_TTL: Duration = Duration::from_secs(30);

/// Waits until the server keeps nothing for `key`: the clean-up after a
/// request that ended without a guard runs in a spawned task, so it may
/// land a moment after the request returned. Fails with `what` if state
/// is still there after 5 s.
async fn until_nothing_left(harness: &dyn Harness, key: &str, what: &str) {
    let give_up_at = Instant::now() + Duration::from_secs(5);
    loop {
        let left = harness.leftovers(key).await;
        if left == 0 {
            return;
        }
        assert!(Instant::now() < give_up_at, "{what}: {left} entries after 5 s");
        sleep(Duration::from_millis(20)).await;
    }
}

/// A key no other check or run uses, so that suites can share a server.
pub fn unique_key(check: &str) -> String {
    format!("conformance/{check}/{:016x}", fastrand::u64(..))
}

/// Generates one test per conformance check.
///
/// The first argument is the test attribute, the second an expression that
/// builds the harness (it may `.await`):
///
/// ```text
/// dlock_testkit::conformance_tests!(#[tokio::test(start_paused = true)] MemoryHarness::new());
/// ```
///
/// The list of checks below is the only one: [`CHECKS`] is made from it,
/// and a unit test fails when a `pub async fn` check of this module is
/// missing from it (or listed without existing).
#[macro_export]
macro_rules! conformance_tests {
    (#[$attribute:meta] $harness:expr) => {
        $crate::conformance_tests!(@checks tests (#[$attribute] $harness));
    };
    (@checks $then:ident $arguments:tt) => {
        $crate::conformance_tests! { @$then $arguments;
            acquire_release,
            try_lock_on_held_key,
            wait_times_out,
            waiter_woken_on_release,
            ttl_expiry_frees_key,
            forgotten_renewed_lock_expires,
            renewal_keeps_lock,
            unrenewed_guard_turns_lost,
            extend_moves_deadline,
            loss_detected_on_force_expiry,
            loss_detected_on_takeover,
            with_lock_stops_on_loss,
            fencing_tokens_increase,
            keys_are_independent,
            dropped_guard_releases,
            cancelled_waiters_leave_nothing,
            bad_input_is_rejected,
            waiters_served_in_turn,
            paused_holder_is_fenced,
            operator_views_show_and_break_a_lock,
            semaphore_admits_up_to_its_limit,
            semaphore_limit_is_kept_with_the_key,
            mutex_and_semaphore_do_not_mix,
            semaphore_bad_limits_are_rejected,
            semaphore_permits_expire_one_by_one,
            semaphore_waiter_woken_on_release,
            semaphore_cancelled_waiters_leave_nothing,
            readers_share_a_key,
            writer_excludes_readers_and_writers,
            last_reader_wakes_the_writer,
            waiting_writer_is_not_starved,
            crashed_reader_frees_within_its_ttl,
            rw_cancelled_waiters_leave_nothing,
            read_locks_and_semaphores_do_not_mix,
            upgrade_is_refused,
            one_leader_at_a_time,
            proclaim_keeps_the_term_and_needs_the_lead,
            lost_leadership_is_signalled,
            dead_leader_is_replaced_after_its_ttl,
            observers_see_every_change,
            observers_see_a_dead_leader_go,
            cancelled_candidates_leave_nothing,
            candidates_lead_in_turn,
            elections_and_locks_do_not_mix,
            bad_election_input_is_rejected,
        }
    };
    (@tests (#[$attribute:meta] $harness:expr); $($check:ident,)*) => {
        $(
            #[$attribute]
            async fn $check() {
                let harness = $harness;
                $crate::conformance::$check(&harness).await;
            }
        )*
    };
    (@names (); $($check:ident,)*) => {
        &[$(stringify!($check)),*]
    };
}

/// The names of every check, in the order [`conformance_tests!`](crate::conformance_tests) runs them.
pub const CHECKS: &[&str] = crate::conformance_tests!(@checks names ());

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::CHECKS;

    #[test]
    fn every_check_is_listed_once() {
        let defined: BTreeSet<&str> = [
            include_str!("basics.rs"),
            include_str!("election.rs"),
            include_str!("leases.rs"),
            include_str!("rwlock.rs"),
            include_str!("semaphore.rs"),
            include_str!("waiting.rs"),
        ]
        .iter()
        .flat_map(|source| source.lines())
        .filter_map(|line| line.strip_prefix("pub async fn "))
        .filter_map(|rest| rest.split_once("(harness: &dyn Harness)"))
        .map(|(name, _)| name)
        .collect();
        let listed: BTreeSet<&str> = CHECKS.iter().copied().collect();
        assert_eq!(listed.len(), CHECKS.len(), "a check is listed twice");
        assert_eq!(
            defined, listed,
            "conformance_tests! and the checks in conformance/ differ"
        );
    }
}
