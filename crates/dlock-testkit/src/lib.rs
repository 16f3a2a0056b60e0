//! Testing tools for dlock, and for code that uses it.
//!
//! * [`MemoryBackend`]: the lock protocol in memory, on Tokio's clock, with
//!   scripted faults. Use it to test how your code behaves when a lock is
//!   contended, slow, unavailable or lost, in milliseconds.
//! * [`FencedResource`]: a stand-in for the storage a lock protects, which
//!   refuses stale fencing tokens and records a history to check.
//! * [`check_mutual_exclusion`]: many clients hammering one key, checked for
//!   overlapping critical sections and tokens that do not increase;
//!   [`check_semaphore`], [`check_read_write`] and [`check_election`] do
//!   the same for the semaphore, the read-write lock and elections.
//! * [`conformance`]: the behaviour suite every backend passes, and
//!   [`MemoryHarness`], which runs it on the in-memory backend.
//! * [`FaultProxy`]: a loopback TCP proxy that makes a link slow or dead on command.

#![forbid(unsafe_code)]

mod checker;
pub mod conformance;
mod election_checker;
mod fenced;
mod memory;
mod memory_harness;
mod proxy;
mod rw_checker;

pub use checker::{CheckReport, CheckerConfig, SemaphoreReport, check_mutual_exclusion, check_semaphore};
pub use election_checker::{ElectionReport, check_election};
pub use fenced::{Event, EventKind, FencedResource, HistoryReport, Section, StaleToken, check_history};
pub use memory::MemoryBackend;
pub use memory_harness::MemoryHarness;
pub use proxy::{Direction, FaultProxy};
pub use rw_checker::{ReadWriteReport, check_read_write};
