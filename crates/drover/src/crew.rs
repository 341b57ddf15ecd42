//! The delivery workers: how many run, per queue and in all, and whether queues wait for one.

use dashmap::DashMap;
use queue::Scheduler;
use queue_key::QueueKey;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio_util::task::TaskTracker;

/// The workers of an engine (and the background tasks recording outcomes).
#[derive(Default)]
pub(crate) struct Crew {
    /// Every task the engine waits for at shutdown.
    pub(crate) tracker: TaskTracker,
    /// Delivery workers running per queue.
    pub(crate) active: DashMap<QueueKey, usize>,
    /// Delivery workers running in all (`delivery.max_workers`).
    pub(crate) running: AtomicUsize,
    /// Some queue with ready mail found no worker in the last dispatcher pass: busy workers
    /// hand over after their turn.
    pub(crate) starving: AtomicBool,
}

/// Decrements the domain's and the global worker counts however the worker ends.
pub(crate) struct WorkerGuard<'a> {
    pub(crate) crew: &'a Crew,
    pub(crate) scheduler: &'a Scheduler,
    pub(crate) queue: QueueKey,
}

impl Drop for WorkerGuard<'_> {
    fn drop(&mut self) {
        let empty = match self.crew.active.get_mut(&self.queue) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if empty {
            self.crew.active.remove_if(&self.queue, |_, n| *n == 0);
        }
        self.crew.running.fetch_sub(1, Ordering::SeqCst);
        self.scheduler.wake();
    }
}
