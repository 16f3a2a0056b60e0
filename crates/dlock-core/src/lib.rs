//! Distributed locks with fencing tokens, loss signals and notification-driven
//! waiting: the backend-independent core of dlock.
//!
//! Users usually depend on a backend crate (`dlock-redis`, `dlock-etcd`),
//! which re-exports this API, or on `dlock-testkit` for the in-memory backend.
//!
//! ```
//! use std::time::Duration;
//! use dlock_core::{Locker, LockError};
//! use dlock_testkit::MemoryBackend;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), LockError> {
//! let locker = Locker::new(MemoryBackend::new());
//! let guard = locker.lock("orders/42").ttl(Duration::from_secs(10)).await?;
//! let token = guard.fencing_token(); // send it with every write
//! assert!(guard.is_held());
//! guard.release().await?;
//! # let _ = token; Ok(()) }
//! ```
//!
//! Writing a backend: see the [`backend`] module; [`LockBackend`]'s
//! documentation is the contract. Backend crates re-export the user API
//! ([`user_api`]) and not the backend-author one.
//!
//! Kinds: [`Locker::lock`] (a mutex, and the writer of a read-write lock),
//! [`Locker::read_lock`], [`Locker::semaphore`] and [`Locker::election`]
//! share one request builder and one guard.
//!
//! Choosing a TTL: [`TTL_SHORT`] (5 s), [`TTL_MEDIUM`] (30 s, the default)
//! or [`TTL_LONG`] (5 min); their docs say when to use which.

#![forbid(unsafe_code)]

pub mod backend;
mod background;
mod backoff;
mod election;
mod error;
mod guard;
mod kind;
mod leader;
mod locker;
mod notify;
mod options;
mod owner;
mod reads;
mod renewals;
mod request;
mod status;
mod telemetry;
mod token;
mod url;

pub use backend::{
    AcquireRequest, Attempt, Busy, Capabilities, ExtendOutcome, Grant, LeaderState, Lease, LeaseHandle,
    LockBackend, LockKind, LossSignal, ProclaimOutcome, ReleaseOutcome,
};
pub use notify::{HubSubscription, ReleaseEvents, ReleaseHub};
pub use options::{validate_permits, validate_timeout, validate_ttl, validate_value, validate_wait};
pub use owner::OwnerToken;
pub use user_api::*;

pub use telemetry::METRICS;
#[cfg(feature = "metrics")]
pub use telemetry::describe_metrics;

/// Re-exported so that backends implement [`LockBackend`] with the same macro version.
pub use async_trait::async_trait;

/// What a user of dlock needs, re-exported as a whole by the backend crates
/// (`pub use dlock_core::user_api::*`), so that `use dlock_redis::*;` and
/// `use dlock_etcd::*;` bring the same items and never clash.
pub mod user_api {
    pub use crate::election::{Campaign, Election, Leadership, Observation};
    pub use crate::error::{BoxError, LockError, NotHeldReason};
    pub use crate::guard::LockGuard;
    pub use crate::kind::LockKind;
    pub use crate::leader::Leader;
    pub use crate::locker::Locker;
    pub use crate::options::{
        DEFAULT_TTL, MAX_KEY_LEN, MAX_PERMITS, MAX_TTL, MAX_VALUE_LEN, MAX_WAIT, MIN_TTL, TTL_LONG,
        TTL_MEDIUM, TTL_SHORT, drift_allowance, validate_key,
    };
    pub use crate::request::LockRequest;
    pub use crate::status::KeyStatus;
    pub use crate::token::FencingToken;
}
