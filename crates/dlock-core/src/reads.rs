//! The read locks a locker's tasks hold, so that a task that asks for the
//! write lock of a key it reads is refused instead of waiting for itself.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::ThreadId;

/// Where a request runs: a Tokio task, or (for the future a runtime's
/// `block_on` drives, which is no task) the thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runner {
    Task(tokio::task::Id),
    Thread(ThreadId),
}

impl Runner {
    fn current() -> Runner {
        match tokio::task::try_id() {
            Some(task) => Runner::Task(task),
            None => Runner::Thread(std::thread::current().id()),
        }
    }
}

/// Kept by a read guard for as long as it lives; the registry sees the
/// guard as gone once this is dropped.
pub(crate) type ReadMark = Arc<()>;

struct HeldRead {
    key: String,
    runner: Runner,
    mark: Weak<()>,
}

/// The read guards of one locker and its clones.
#[derive(Default)]
pub(crate) struct HeldReads(Mutex<Vec<HeldRead>>);

impl HeldReads {
    /// Records a read guard on `key` acquired by the current task; the
    /// guard keeps the returned mark.
    pub(crate) fn record(&self, key: &str) -> ReadMark {
        let mark = ReadMark::default();
        let mut held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        held.retain(|read| read.mark.strong_count() > 0);
        held.push(HeldRead {
            key: key.to_owned(),
            runner: Runner::current(),
            mark: Arc::downgrade(&mark),
        });
        mark
    }

    /// Whether the current task holds a read guard on `key`.
    pub(crate) fn held_here(&self, key: &str) -> bool {
        let runner = Runner::current();
        let held = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        held.iter()
            .any(|read| read.runner == runner && read.key == key && read.mark.strong_count() > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_read_counts_for_its_own_task_until_its_mark_is_dropped() {
        let reads = Arc::new(HeldReads::default());
        let mark = reads.record("catalog");
        assert!(reads.held_here("catalog"));
        assert!(!reads.held_here("other"));
        let elsewhere = Arc::clone(&reads);
        let seen_by_another_task = tokio::spawn(async move { elsewhere.held_here("catalog") })
            .await
            .unwrap_or(true);
        assert!(!seen_by_another_task);
        drop(mark);
        assert!(!reads.held_here("catalog"));
    }
}
