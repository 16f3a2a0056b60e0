//! `MemoryHarness`: the conformance suite's harness over `MemoryBackend`.

use async_trait::async_trait;

use crate::MemoryBackend;

/// The conformance harness for [`MemoryBackend`]: every locker is a clone
/// of one backend, like clients of one server. `cargo test -p
/// dlock-testkit` runs the whole suite with it, on a paused clock.
///
/// ```
/// use dlock_testkit::MemoryHarness;
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// dlock_testkit::conformance::fencing_tokens_increase(&MemoryHarness::new()).await;
/// # }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryHarness {
    backend: MemoryBackend,
}

impl MemoryHarness {
    /// A harness over a fresh backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// The backend, for fault injection.
    pub fn backend(&self) -> &MemoryBackend {
        &self.backend
    }
}

#[async_trait]
impl crate::conformance::Harness for MemoryHarness {
    async fn locker(&self) -> dlock_core::Locker {
        dlock_core::Locker::new(self.backend.clone())
    }

    async fn force_expire(&self, key: &str) {
        self.backend.force_expire(key);
    }

    async fn leftovers(&self, key: &str) -> usize {
        self.backend.leases_on(key) + self.backend.waiting_on(key)
    }

    fn config(&self) -> crate::conformance::SuiteConfig {
        crate::conformance::SuiteConfig::default().election_fifo(true)
    }
}
