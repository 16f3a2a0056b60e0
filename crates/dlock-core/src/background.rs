//! The clean-up a locker leaves to tasks (the release of a dropped guard,
//! the clean-up after a cancelled or failed request), counted so that a
//! process can wait for it before it exits: a runtime that shuts down
//! drops its tasks, and what they were giving back then stays until its
//! TTL runs out.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// One locker's clean-up tasks still running.
#[derive(Default)]
pub(crate) struct Background {
    running: AtomicUsize,
    idle: Notify,
}

impl Background {
    /// Runs `task` on `runtime`, counted until it ends (or is dropped).
    pub(crate) fn spawn(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.running.fetch_add(1, Ordering::SeqCst);
        let counted = Counted(Arc::clone(self));
        runtime.spawn(async move {
            let _counted = counted;
            task.await;
        });
    }

    /// Resolves once no clean-up task runs.
    pub(crate) async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Counts one task until it is dropped, finished or not.
struct Counted(Arc<Background>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
