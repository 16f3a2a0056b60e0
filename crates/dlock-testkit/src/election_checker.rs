//! `check_election`: candidates campaigning in one election, checked at a
//! fenced resource and by an observer.

use dlock_core::{Leader, LockError, Locker};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::checker::{CheckerConfig, keep_first_errors, stay_inside};
use crate::fenced::{FencedResource, HistoryReport};

/// What [`check_election`] saw.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ElectionReport {
    /// Candidates that campaigned.
    pub candidates: usize,
    /// Terms led: campaigns that returned a leadership.
    pub terms: usize,
    /// Campaigns that returned an error.
    pub failed: usize,
    /// Candidates that led at least once (every one should).
    pub candidates_that_led: usize,
    /// Terms in which `leader()`, read by the leader, named someone else.
    pub leader_mismatches: usize,
    /// Leaders the observer reported.
    pub observed: usize,
    /// Observed leaders whose term was below one observed before them.
    pub observed_out_of_order: usize,
    /// Errors the observer was given.
    pub observer_errors: usize,
    /// The fenced resource's history: leaders' terms there (one leader at
    /// a time, terms strictly increasing).
    pub history: HistoryReport,
    /// The first few errors, for the test output.
    pub errors: Vec<String>,
}

impl ElectionReport {
    /// Panics with the report unless it is clean: no two leaders at the
    /// resource at once, terms strictly increasing and never stale, every
    /// candidate led, `leader()` named each leader during its term, and the
    /// observer saw leaders, without errors, whose terms never went back.
    pub fn assert_clean(&self) {
        let clean = self.history.is_clean()
            && self.history.rejected_stale == 0
            && self.failed == 0
            && self.candidates_that_led == self.candidates
            && self.leader_mismatches == 0
            && self.observed_out_of_order == 0
            && self.observer_errors == 0
            && self.observed > 0;
        assert!(clean, "the election misbehaved: {self:#?}");
    }
}

/// Runs `config.tasks` candidates (task `i` on `lockers[i % lockers.len()]`)
/// that each campaign `config.acquisitions_per_task` times in the election
/// `key`; once elected, a candidate enters a [`FencedResource`] with its
/// term, reads `leader()`, holds for `config.hold`, leaves, and resigns.
/// An observer on `lockers[0]` watches the election meanwhile.
///
/// ```
/// use dlock_core::Locker;
/// use dlock_testkit::{CheckerConfig, MemoryBackend, check_election};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// let backend = MemoryBackend::new();
/// let lockers: Vec<Locker> = (0..8).map(|_| Locker::new(backend.clone())).collect();
/// let report = check_election(&lockers, "checker/election", CheckerConfig::default().load(8, 5)).await;
/// report.assert_clean();
/// assert_eq!(report.terms, 40);
/// # }
/// ```
pub async fn check_election(lockers: &[Locker], key: &str, config: CheckerConfig) -> ElectionReport {
    assert!(!lockers.is_empty(), "check_election needs at least one locker");
    let resource = FencedResource::new();
    let (stop, stopped) = watch::channel(false);
    let observer = tokio::spawn(observe(lockers[0].clone(), key.to_owned(), stopped));
    let mut tasks = JoinSet::new();
    for candidate in 0..config.tasks {
        let locker = lockers[candidate % lockers.len()].clone();
        let (resource, key, config) = (resource.clone(), key.to_owned(), config.clone());
        tasks.spawn(async move { campaign(candidate, &locker, &key, &resource, &config).await });
    }
    let mut report = ElectionReport {
        candidates: config.tasks,
        ..ElectionReport::default()
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(outcome) => {
                report.terms += outcome.terms;
                report.failed += outcome.errors.len();
                report.leader_mismatches += outcome.leader_mismatches;
                report.candidates_that_led += usize::from(outcome.terms > 0);
                keep_first_errors(&mut report.errors, outcome.errors);
            }
            Err(join_error) => {
                report.failed += 1;
                report.errors.push(format!("a candidate task died: {join_error}"));
            }
        }
    }
    let _ = stop.send(true);
    match observer.await {
        Ok(observed) => {
            report.observed = observed.leaders;
            report.observed_out_of_order = observed.out_of_order;
            report.observer_errors = observed.failed;
            keep_first_errors(&mut report.errors, observed.errors);
        }
        Err(join_error) => report.errors.push(format!("the observer died: {join_error}")),
    }
    report.history = resource.check();
    report
}

#[derive(Default)]
struct CandidateOutcome {
    terms: usize,
    leader_mismatches: usize,
    errors: Vec<String>,
}

async fn campaign(
    candidate: usize,
    locker: &Locker,
    key: &str,
    resource: &FencedResource,
    config: &CheckerConfig,
) -> CandidateOutcome {
    let mut outcome = CandidateOutcome::default();
    let election = locker.election(key);
    for round in 0..config.acquisitions_per_task {
        let value = format!("candidate-{candidate}/{round}");
        let leadership = match election.campaign(&value).ttl(config.ttl).wait(config.wait).await {
            Ok(leadership) => leadership,
            Err(error) => {
                outcome
                    .errors
                    .push(format!("candidate {candidate}: campaign: {error}"));
                continue;
            }
        };
        outcome.terms += 1;
        // A stale term is fencing doing its job; the history counts it.
        if let Ok(section) = resource.enter(candidate, leadership.term()) {
            let expected = Leader {
                value,
                term: leadership.term(),
            };
            match election.leader().await {
                Ok(Some(shown)) if shown == expected => {}
                Ok(shown) => {
                    outcome.leader_mismatches += 1;
                    outcome.errors.push(format!(
                        "candidate {candidate} led as {expected:?}, leader() said {shown:?}"
                    ));
                }
                Err(error) => outcome
                    .errors
                    .push(format!("candidate {candidate}: leader(): {error}")),
            }
            stay_inside(config.hold).await;
            section.exit();
        }
        match leadership.resign().await {
            Ok(()) | Err(LockError::NotHeld { .. }) => {}
            Err(error) => outcome
                .errors
                .push(format!("candidate {candidate}: resign: {error}")),
        }
    }
    outcome
}

#[derive(Default)]
struct ObserverOutcome {
    leaders: usize,
    out_of_order: usize,
    failed: usize,
    errors: Vec<String>,
}

/// Counts the leaders an observer is told of until `stopped`, and how many
/// came with a term below one told before (changes may be skipped when
/// they come faster than it reads, never reordered).
async fn observe(locker: Locker, key: String, mut stopped: watch::Receiver<bool>) -> ObserverOutcome {
    let mut outcome = ObserverOutcome::default();
    let mut changes = locker.election(&key).observe();
    let mut highest = None;
    loop {
        let item = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return outcome,
            item = changes.next() => item,
        };
        match item {
            Some(Ok(Some(leader))) => {
                outcome.leaders += 1;
                if highest.is_some_and(|highest| leader.term < highest) {
                    outcome.out_of_order += 1;
                    outcome
                        .errors
                        .push(format!("observer: term {} after {highest:?}", leader.term));
                }
                highest = highest.max(Some(leader.term));
            }
            Some(Ok(None)) => {}
            Some(Err(error)) => {
                outcome.failed += 1;
                outcome.errors.push(format!("observer: {error}"));
            }
            None => return outcome,
        }
    }
}
