//! The delivery workers: how many run, per queue and in all, and whether queues wait for one.

use dashmap::DashMap;
use queue::Scheduler;
use queue_key::QueueKey;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

/// Outcomes being recorded at once. A worker hands each outcome to a task so fsync latency
/// never idles its session; when recording falls this far behind (a wave of a million
/// deferrals), workers wait instead of piling up tasks that each hold a message's metadata.
pub(crate) const RECORDING_IN_FLIGHT: usize = 4096;

/// The workers of an engine (and the background tasks recording outcomes).
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
    /// Room for outcomes being recorded ([`RECORDING_IN_FLIGHT`]).
    pub(crate) recording: Arc<Semaphore>,
}

impl Default for Crew {
    fn default() -> Crew {
        Crew {
            tracker: TaskTracker::new(),
            active: DashMap::new(),
            running: AtomicUsize::new(0),
            starving: AtomicBool::new(false),
            recording: Arc::new(Semaphore::new(RECORDING_IN_FLIGHT)),
        }
    }
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
