//! The conformance suite and the mutual-exclusion checker on the in-memory
//! backend, under a paused clock: `cargo test -p dlock-testkit` needs no
//! server.

use dlock_core::Locker;
use dlock_testkit::{CheckerConfig, MemoryHarness, check_mutual_exclusion};

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
