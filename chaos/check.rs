//! The checker: reads the history of a case and counts what must be 0.

use std::collections::HashSet;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use dlock_core::FencingToken;
use dlock_testkit::EventKind;

use crate::case::{KEYS, PERMITS, STRANDED_AFTER, Shared, Tally};

/// Reads the histories: overlapping accepted writes, stale rejections,
/// stranded waiters.
pub(crate) fn check(shared: &Shared, windows: &[(Instant, Instant)], tally: &mut Tally) {
    let sections = shared
        .permit_sections
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    tally.over_admissions = over_admissions(&sections, PERMITS);
    drop(sections);
    let sections = shared.rw_sections.lock().unwrap_or_else(PoisonError::into_inner);
    tally.rw_overlaps = rw_overlaps(&sections);
    drop(sections);
    let sections = shared
        .leader_sections
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    // Leaders exclude each other as writers do.
    let leaders: Vec<_> = sections
        .iter()
        .map(|&(entered, left)| (entered, left, true))
        .collect();
    tally.two_leaders = rw_overlaps(&leaders);
    drop(sections);
    phantom_leaders(shared, tally);
    // The election's resource too: leaders write with their terms.
    for resource in shared.resources.iter().chain([&shared.election_resource]) {
        let mut closed: HashSet<(usize, FencingToken)> = HashSet::new();
        let mut current: Option<(usize, FencingToken)> = None;
        for event in resource.history() {
            match event.kind {
                EventKind::RejectedStale => tally.stale_rejected += 1,
                EventKind::Entered => {
                    let holding = (event.client, event.token);
                    if current != Some(holding) {
                        if let Some(previous) = current {
                            closed.insert(previous);
                        }
                        // A holding that wrote again after another holding's
                        // accepted write: the two interleaved.
                        if closed.contains(&holding) {
                            tally.overlapping += 1;
                            if tally.notes.len() < 5 {
                                tally.notes.push(format!(
                                    "overlap: client {} wrote with token {} after another holder",
                                    event.client, event.token
                                ));
                            }
                        }
                        current = Some(holding);
                    }
                }
                EventKind::Exited => {}
            }
        }
    }
    let grants = shared.grants.lock().unwrap_or_else(PoisonError::into_inner);
    let timeouts = shared.timeouts.lock().unwrap_or_else(PoisonError::into_inner);
    for &(key, began, gave_up) in timeouts.iter() {
        let mut busy: Vec<(Instant, Instant)> = grants
            .iter()
            .filter(|(granted_key, from, to)| *granted_key == key && *to > began && *from < gave_up)
            .map(|&(_, from, to)| (from, to))
            .collect();
        // Fault windows count as busy: waits may fail there by design.
        busy.extend(windows.iter().filter(|(from, to)| *to > began && *from < gave_up));
        busy.sort();
        let mut free_since = began;
        let mut longest_free = Duration::ZERO;
        for (from, to) in busy {
            longest_free = longest_free.max(from.saturating_duration_since(free_since));
            free_since = free_since.max(to);
        }
        longest_free = longest_free.max(gave_up.saturating_duration_since(free_since));
        if longest_free > STRANDED_AFTER {
            tally.stranded += 1;
            if tally.notes.len() < 5 {
                tally.notes.push(format!(
                    "stranded: a waiter on {} timed out although the key was free for {longest_free:.1?}",
                    KEYS[key]
                ));
            }
        }
    }
}

/// Checks the observer against the campaigns: every leader it reported
/// was a campaign's value, with the term that campaign was granted (when
/// its answer arrived).
fn phantom_leaders(shared: &Shared, tally: &mut Tally) {
    let campaigns = shared.campaigns.lock().unwrap_or_else(PoisonError::into_inner);
    let observed = shared.observed.lock().unwrap_or_else(PoisonError::into_inner);
    tally.observed = observed.len();
    for leader in observed.iter() {
        let note = match campaigns.get(&leader.value) {
            // Granted, but the answer was lost in a fault: any term.
            Some(None) => continue,
            Some(Some(term)) if *term == leader.term => continue,
            // The campaign led under another term: a key an earlier attempt
            // of it left (its answer lost in a fault) was reported before
            // it was cleaned up. Counted apart; see docs/reliability.md.
            Some(Some(term)) => {
                tally.other_term_leaders += 1;
                format!(
                    "observer reported {:?} with term {}; that campaign led with term {term}",
                    leader.value, leader.term
                )
            }
            None => {
                tally.phantom_leaders += 1;
                format!(
                    "observer reported {:?} with term {}, a value no campaign asked for",
                    leader.value, leader.term
                )
            }
        };
        if tally.notes.len() < 5 {
            tally.notes.push(note);
        }
    }
}

/// Instants at which more than `permits` accepted permit sections were
/// inside at once: each section that enters while `permits` others are
/// inside counts once.
pub(crate) fn over_admissions(sections: &[(Instant, Instant)], permits: u32) -> usize {
    let (mut inside, mut over) = (0i64, 0);
    for (_, change, _) in crossings(sections.iter().map(|&(entered, left)| (entered, left, false))) {
        inside += i64::from(change);
        if change > 0 && inside > i64::from(permits) {
            over += 1;
        }
    }
    over
}

/// Accepted read-write sections that began while another was inside that
/// they must exclude: a writer while anyone was inside, a reader while a
/// writer was.
pub(crate) fn rw_overlaps(sections: &[(Instant, Instant, bool)]) -> usize {
    let (mut readers, mut writers, mut overlaps) = (0i64, 0i64, 0);
    for (_, change, writing) in crossings(sections.iter().copied()) {
        if change > 0 && (writers > 0 || (writing && readers > 0)) {
            overlaps += 1;
        }
        let count = if writing { &mut writers } else { &mut readers };
        *count += i64::from(change);
    }
    overlaps
}

/// The entries (+1) and exits (-1) of (entered, left, tag) sections, in
/// time order. An exit sorts before an entry at the same instant: touching
/// sections do not overlap.
fn crossings(sections: impl Iterator<Item = (Instant, Instant, bool)>) -> Vec<(Instant, i32, bool)> {
    let mut events: Vec<(Instant, i32, bool)> = sections
        .flat_map(|(entered, left, tag)| [(entered, 1, tag), (left, -1, tag)])
        .collect();
    events.sort_unstable();
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared::new()
    }

    #[test]
    fn more_permits_inside_than_the_limit_count_as_over_admissions() {
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        // Two permits: three sections overlap during 20..30 ms.
        let sections = [(at(0), at(30)), (at(10), at(40)), (at(20), at(50))];
        assert_eq!(over_admissions(&sections, 2), 1);
        assert_eq!(over_admissions(&sections, 3), 0);
        // Back to back is not an overlap.
        assert_eq!(over_admissions(&[(at(0), at(10)), (at(10), at(20))], 1), 0);
    }

    #[test]
    fn readers_may_overlap_and_writers_may_not() {
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let readers = [(at(0), at(30), false), (at(10), at(40), false)];
        assert_eq!(rw_overlaps(&readers), 0);
        // A writer inside readers, and a reader inside a writer.
        let mut mixed = readers.to_vec();
        mixed.push((at(20), at(50), true));
        assert_eq!(rw_overlaps(&mixed), 1);
        mixed.push((at(45), at(60), false));
        assert_eq!(rw_overlaps(&mixed), 2);
        // Back to back is not an overlap; two writers at once are.
        assert_eq!(rw_overlaps(&[(at(0), at(10), true), (at(10), at(20), false)]), 0);
        assert_eq!(rw_overlaps(&[(at(0), at(10), true), (at(5), at(20), true)]), 1);
    }

    #[test]
    fn interleaved_holders_count_as_overlap() {
        let shared = shared();
        let resource = &shared.resources[0];
        // Two holders given the same token (what a lost counter could do):
        // the fence cannot tell them apart, the checker must.
        resource.write(1, FencingToken::new(7)).expect("first holder");
        resource.write(2, FencingToken::new(7)).expect("second holder");
        resource
            .write(1, FencingToken::new(7))
            .expect("first holder again");
        let mut tally = Tally::default();
        check(&shared, &[], &mut tally);
        assert_eq!(tally.overlapping, 1);
    }

    #[test]
    fn fenced_late_writes_are_not_overlaps() {
        let shared = shared();
        let resource = &shared.resources[0];
        resource.write(1, FencingToken::new(7)).expect("first holder");
        resource.write(2, FencingToken::new(8)).expect("second holder");
        assert!(resource.write(1, FencingToken::new(7)).is_err());
        let mut tally = Tally::default();
        check(&shared, &[], &mut tally);
        assert_eq!((tally.overlapping, tally.stale_rejected), (0, 1));
    }

    #[test]
    fn a_timeout_on_a_free_key_is_stranded_unless_a_fault_covers_it() {
        let shared = shared();
        let began = Instant::now();
        let gave_up = began + Duration::from_secs(4);
        shared
            .timeouts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((0, began, gave_up));
        let mut tally = Tally::default();
        check(&shared, &[], &mut tally);
        assert_eq!(tally.stranded, 1);
        let mut tally = Tally::default();
        check(&shared, &[(began, gave_up)], &mut tally);
        assert_eq!(tally.stranded, 0);
    }

    #[test]
    fn two_leaders_at_once_and_phantom_leaders_are_counted() {
        let shared = shared();
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        shared
            .leader_sections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend([(at(0), at(10)), (at(10), at(20)), (at(15), at(30))]);
        {
            let mut campaigns = shared.campaigns.lock().unwrap_or_else(PoisonError::into_inner);
            campaigns.insert("a".to_owned(), Some(FencingToken::new(3)));
            campaigns.insert("lost-answer".to_owned(), None);
        }
        let leader = |value: &str, term: u64| dlock_core::Leader {
            value: value.to_owned(),
            term: FencingToken::new(term),
        };
        shared
            .observed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend([
                leader("a", 3),
                leader("lost-answer", 9),
                leader("a", 4),
                leader("nobody", 5),
            ]);
        let mut tally = Tally::default();
        check(&shared, &[], &mut tally);
        assert_eq!(tally.two_leaders, 1, "back to back is fine, 15..20 is not");
        assert_eq!(
            (tally.observed, tally.phantom_leaders, tally.other_term_leaders),
            (4, 1, 1)
        );
    }
}
