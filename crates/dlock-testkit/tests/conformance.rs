//! The conformance suite and the mutual-exclusion checker on the in-memory
//! backend, under a paused clock: `cargo test -p dlock-testkit` needs no
//! server.

use dlock_core::Locker;
use std::time::Duration;

use dlock_testkit::{
    CheckerConfig, MemoryBackend, MemoryHarness, check_election, check_mutual_exclusion, check_read_write,
    check_semaphore,
};

dlock_testkit::conformance_tests!(
    #[tokio::test(start_paused = true)]
    MemoryHarness::new()
);

#[tokio::test(start_paused = true)]
async fn mutual_exclusion_16_tasks_200_acquisitions() {
    let harness = MemoryHarness::new();
    let lockers: Vec<Locker> = (0..16).map(|_| Locker::new(harness.backend().clone())).collect();
    let report =
        check_mutual_exclusion(&lockers, "checker/memory", CheckerConfig::default().load(16, 200)).await;
    report.assert_clean();
    assert_eq!(report.acquired, 3200);
    assert_eq!(report.history.accepted, 3200);
}

#[tokio::test(start_paused = true)]
async fn semaphore_16_tasks_on_4_permits() {
    let harness = MemoryHarness::new();
    let lockers: Vec<Locker> = (0..16).map(|_| Locker::new(harness.backend().clone())).collect();
    let config = CheckerConfig::default()
        .load(16, 100)
        .hold(Duration::from_millis(2));
    let report = check_semaphore(&lockers, "checker/memory-semaphore", 4, config).await;
    report.assert_clean();
    assert_eq!(report.acquired, 1600);
    assert_eq!(
        report.most_inside, 4,
        "16 tasks holding 2 ms each must fill all 4 permits"
    );
}

/// The semaphore checker catches what it is for: two backends that do
/// not share state stand for a split brain, each admitting 4.
#[tokio::test(start_paused = true)]
async fn the_semaphore_checker_catches_over_admission() {
    let (one, other) = (MemoryBackend::new(), MemoryBackend::new());
    let lockers = vec![Locker::new(one), Locker::new(other)];
    let config = CheckerConfig::default()
        .load(16, 20)
        .hold(Duration::from_millis(2));
    let report = check_semaphore(&lockers, "checker/split-brain", 4, config).await;
    assert!(
        report.over_admissions > 0 && report.most_inside > 4,
        "{report:#?}"
    );
    assert!(report.repeated_tokens > 0, "{report:#?}");
}

#[tokio::test(start_paused = true)]
async fn read_write_16_tasks_90_percent_reads() {
    let harness = MemoryHarness::new();
    let lockers: Vec<Locker> = (0..16).map(|_| Locker::new(harness.backend().clone())).collect();
    let config = CheckerConfig::default()
        .load(16, 100)
        .hold(Duration::from_millis(1));
    let report = check_read_write(&lockers, "checker/memory-rw", config).await;
    report.assert_clean();
    assert_eq!(report.reads + report.writes, 1600);
    assert!(report.writes > 0, "{report:#?}");
    assert!(report.most_readers_inside > 1, "readers must share: {report:#?}");
}

/// The read-write checker catches what it is for: two backends that do
/// not share state stand for a split brain, letting writers and readers in
/// at once.
#[tokio::test(start_paused = true)]
async fn the_read_write_checker_catches_overlaps() {
    let (one, other) = (MemoryBackend::new(), MemoryBackend::new());
    let lockers = vec![Locker::new(one), Locker::new(other)];
    let config = CheckerConfig::default()
        .load(16, 40)
        .hold(Duration::from_millis(2))
        .read_percent(50);
    let report = check_read_write(&lockers, "checker/rw-split-brain", config).await;
    assert!(
        report.reader_writer_overlaps > 0 && report.writer_overlaps > 0,
        "{report:#?}"
    );
    assert!(report.repeated_tokens > 0, "{report:#?}");
}

#[tokio::test(start_paused = true)]
async fn election_8_candidates_lead_in_turn() {
    let harness = MemoryHarness::new();
    let lockers: Vec<Locker> = (0..8).map(|_| Locker::new(harness.backend().clone())).collect();
    let config = CheckerConfig::default()
        .load(8, 20)
        .hold(Duration::from_millis(3));
    let report = check_election(&lockers, "checker/memory-election", config).await;
    report.assert_clean();
    assert_eq!(report.terms, 160);
    assert!(
        report.observed > 1,
        "the observer saw the leaders change: {report:#?}"
    );
}

/// The election checker catches what it is for: two backends that do not
/// share state stand for a split brain, with two leaders at once.
#[tokio::test(start_paused = true)]
async fn the_election_checker_catches_two_leaders() {
    let (one, other) = (MemoryBackend::new(), MemoryBackend::new());
    let lockers = vec![Locker::new(one), Locker::new(other)];
    let config = CheckerConfig::default()
        .load(8, 10)
        .hold(Duration::from_millis(3));
    let report = check_election(&lockers, "checker/election-split-brain", config).await;
    assert!(report.history.overlaps > 0, "{report:#?}");
    assert!(
        report.history.rejected_stale + report.history.non_increasing > 0,
        "{report:#?}"
    );
}
