//! `FencedResource`: a stand-in for the storage a lock protects, which refuses
//! stale fencing tokens and records who was inside when.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dlock_core::FencingToken;

/// A resource guarded by fencing: it accepts a critical section only when its
/// token is at least the highest token it has accepted, and keeps a history
/// of every section for [`check`](Self::check).
///
/// Clones share the same resource.
///
/// ```
/// use dlock_core::FencingToken;
/// use dlock_testkit::FencedResource;
///
/// let resource = FencedResource::new();
/// let section = resource.enter(1, FencingToken::new(5)).expect("fresh token");
/// section.exit();
/// // A holder with an older token is turned away.
/// assert!(resource.enter(2, FencingToken::new(4)).is_err());
/// let report = resource.check();
/// assert_eq!((report.accepted, report.rejected_stale, report.overlaps), (1, 1, 0));
/// ```
#[derive(Clone, Default)]
pub struct FencedResource {
    inner: Arc<Mutex<ResourceState>>,
}

#[derive(Default)]
struct ResourceState {
    highest: Option<FencingToken>,
    history: Vec<Event>,
    next_section: u64,
}

/// One entry of a resource's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Which client (task, process) acted.
    pub client: usize,
    /// The token it presented.
    pub token: FencingToken,
    /// The section this event belongs to.
    pub section: u64,
    /// What happened.
    pub kind: EventKind,
}

/// What an [`Event`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A section was let in.
    Entered,
    /// A section was turned away: its token was older than one already accepted.
    RejectedStale,
    /// A section ended.
    Exited,
}

/// Returned when a token is older than the highest one the resource accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleToken {
    /// The token presented.
    pub presented: FencingToken,
    /// The highest token accepted so far.
    pub highest: FencingToken,
}

impl fmt::Display for StaleToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fencing token {} is stale: the resource already accepted token {}",
            self.presented, self.highest
        )
    }
}

impl std::error::Error for StaleToken {}

/// An accepted critical section; ends at [`exit`](Self::exit) or on drop.
#[must_use = "a section ends when dropped"]
#[derive(Debug)]
pub struct Section {
    resource: FencedResource,
    client: usize,
    token: FencingToken,
    section: u64,
}

impl Section {
    /// Ends the section.
    pub fn exit(self) {}
}

impl Drop for Section {
    fn drop(&mut self) {
        self.resource.state().history.push(Event {
            client: self.client,
            token: self.token,
            section: self.section,
            kind: EventKind::Exited,
        });
    }
}

impl FencedResource {
    /// A resource that has accepted nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets `client` in with `token`, unless a higher token was accepted before.
    pub fn enter(&self, client: usize, token: FencingToken) -> Result<Section, StaleToken> {
        let mut state = self.state();
        let section = state.next_section;
        state.next_section += 1;
        if let Some(highest) = state.highest.filter(|highest| token < *highest) {
            state.history.push(Event {
                client,
                token,
                section,
                kind: EventKind::RejectedStale,
            });
            return Err(StaleToken {
                presented: token,
                highest,
            });
        }
        state.highest = Some(token);
        state.history.push(Event {
            client,
            token,
            section,
            kind: EventKind::Entered,
        });
        Ok(Section {
            resource: self.clone(),
            client,
            token,
            section,
        })
    }

    /// A one-step write: enter and exit at once.
    pub fn write(&self, client: usize, token: FencingToken) -> Result<(), StaleToken> {
        self.enter(client, token).map(Section::exit)
    }

    /// The highest token accepted so far.
    pub fn highest_token(&self) -> Option<FencingToken> {
        self.state().highest
    }

    /// A copy of the history so far.
    pub fn history(&self) -> Vec<Event> {
        self.state().history.clone()
    }

    /// Checks the history: accepted sections must never overlap, and each
    /// accepted section must carry a higher token than the one before.
    pub fn check(&self) -> HistoryReport {
        check_history(&self.state().history)
    }

    fn state(&self) -> MutexGuard<'_, ResourceState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for FencedResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("FencedResource")
            .field("highest", &state.highest)
            .field("events", &state.history.len())
            .finish()
    }
}

/// What [`FencedResource::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryReport {
    /// Sections let in.
    pub accepted: usize,
    /// Sections turned away by fencing.
    pub rejected_stale: usize,
    /// Sections let in while another accepted section was still open.
    pub overlaps: usize,
    /// Accepted sections whose token was not higher than the previous one's.
    pub non_increasing: usize,
    /// The first few violations, described.
    pub violations: Vec<String>,
}

impl HistoryReport {
    /// True when no accepted sections overlapped and tokens always increased.
    pub fn is_clean(&self) -> bool {
        self.overlaps == 0 && self.non_increasing == 0
    }
}

/// Checks a history for overlapping accepted sections and tokens that do not increase.
pub fn check_history(history: &[Event]) -> HistoryReport {
    const SHOWN: usize = 10;
    let mut report = HistoryReport::default();
    let mut open: HashSet<u64> = HashSet::new();
    let mut previous: Option<Event> = None;
    for event in history {
        match event.kind {
            EventKind::Entered => {
                report.accepted += 1;
                if !open.is_empty() {
                    report.overlaps += 1;
                    if report.violations.len() < SHOWN {
                        report.violations.push(format!(
                            "client {} entered with token {} while {} other section(s) were open",
                            event.client,
                            event.token,
                            open.len()
                        ));
                    }
                }
                if let Some(previous) = previous.filter(|previous| event.token <= previous.token) {
                    report.non_increasing += 1;
                    if report.violations.len() < SHOWN {
                        report.violations.push(format!(
                            "client {} entered with token {} after client {} had entered with token {}",
                            event.client, event.token, previous.client, previous.token
                        ));
                    }
                }
                open.insert(event.section);
                previous = Some(*event);
            }
            EventKind::RejectedStale => report.rejected_stale += 1,
            EventKind::Exited => {
                open.remove(&event.section);
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(value: u64) -> FencingToken {
        FencingToken::new(value)
    }

    #[test]
    fn overlapping_sections_are_reported() {
        let resource = FencedResource::new();
        let first = resource.enter(1, token(1)).expect("first");
        let second = resource.enter(2, token(2)).expect("second");
        drop((first, second));
        let report = resource.check();
        assert_eq!(report.overlaps, 1);
        assert!(!report.is_clean());
    }

    #[test]
    fn a_repeated_token_is_reported_as_not_increasing() {
        let resource = FencedResource::new();
        resource.write(1, token(3)).expect("first");
        resource.write(2, token(3)).expect("equal tokens are let in");
        let report = resource.check();
        assert_eq!(
            (report.accepted, report.non_increasing, report.overlaps),
            (2, 1, 0)
        );
    }

    #[test]
    fn sequential_sections_with_rising_tokens_are_clean() {
        let resource = FencedResource::new();
        for value in 1..=5 {
            resource.write(0, token(value)).expect("rising");
        }
        assert_eq!(
            resource.write(0, token(2)),
            Err(StaleToken {
                presented: token(2),
                highest: token(5)
            })
        );
        let report = resource.check();
        assert!(report.is_clean());
        assert_eq!((report.accepted, report.rejected_stale), (5, 1));
    }
}
