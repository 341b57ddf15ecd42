//! The in-memory schedule: a timer of deferred messages and a ready queue per destination.
//!
//! Only ids and destination names live here; metadata and bodies stay in the spool, so the
//! footprint per queued message is a few dozen bytes.

use crate::MessageId;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

pub(crate) const QUEUE_GAUGE: &str = "drover_queue_messages";

/// Per-destination counts, for the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DestinationCounts {
    /// Due now, waiting for a connection.
    pub ready: usize,
    /// Waiting for a later time.
    pub scheduled: usize,
    /// Taken by a delivery worker.
    pub in_flight: usize,
    /// Earliest reception time among `ready`/`scheduled` messages known here (ms since epoch).
    pub oldest_received_ms: Option<u64>,
}

#[derive(Default)]
struct Inner {
    timer: BTreeMap<(u64, MessageId), Arc<str>>,
    ready: HashMap<Arc<str>, VecDeque<(MessageId, u64)>>,
    received: HashMap<MessageId, u64>,
    counts: HashMap<Arc<str>, DestinationCounts>,
    totals: DestinationCounts,
}

/// The schedule, shared by injection and delivery.
#[derive(Default)]
pub struct Scheduler {
    inner: Mutex<Inner>,
    notify: Notify,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

impl Inner {
    fn intern(&mut self, destination: &str) -> Arc<str> {
        match self.counts.get_key_value(destination) {
            Some((k, _)) => Arc::clone(k),
            None => {
                let k: Arc<str> = Arc::from(destination);
                self.counts
                    .insert(Arc::clone(&k), DestinationCounts::default());
                k
            }
        }
    }

    fn adjust(&mut self, destination: &Arc<str>, f: impl Fn(&mut DestinationCounts)) {
        f(&mut self.totals);
        let entry = self.counts.entry(Arc::clone(destination)).or_default();
        f(entry);
        if entry.ready == 0 && entry.scheduled == 0 && entry.in_flight == 0 {
            self.counts.remove(destination);
        }
    }

    fn publish(&self) {
        metrics::gauge!(QUEUE_GAUGE, "state" => "scheduled").set(self.totals.scheduled as f64);
        metrics::gauge!(QUEUE_GAUGE, "state" => "ready").set(self.totals.ready as f64);
        metrics::gauge!(QUEUE_GAUGE, "state" => "in_flight").set(self.totals.in_flight as f64);
    }
}

impl Scheduler {
    /// An empty schedule.
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain counters behind, still consistent enough
        // to go on delivering; poisoning would stop the whole engine for nothing.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `id` for `destination` at `due_ms`; if that is not in the future it is ready now.
    pub fn schedule(
        &self,
        id: MessageId,
        destination: &str,
        due_ms: u64,
        received_ms: u64,
        now_ms: u64,
    ) {
        {
            let mut inner = self.lock();
            let dest = inner.intern(destination);
            inner.received.insert(id, received_ms);
            if due_ms <= now_ms {
                inner
                    .ready
                    .entry(Arc::clone(&dest))
                    .or_default()
                    .push_back((id, received_ms));
                inner.adjust(&dest, |c| c.ready += 1);
            } else {
                inner.timer.insert((due_ms, id), Arc::clone(&dest));
                inner.adjust(&dest, |c| c.scheduled += 1);
            }
            inner.publish();
        }
        self.notify.notify_one();
    }

    /// Moves every message due at `now_ms` from the timer to its ready queue; returns how many.
    pub fn promote(&self, now_ms: u64) -> usize {
        let mut inner = self.lock();
        let mut moved = 0;
        while let Some(entry) = inner.timer.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let ((_, id), dest) = entry.remove_entry();
            let received = inner.received.get(&id).copied().unwrap_or(0);
            inner
                .ready
                .entry(Arc::clone(&dest))
                .or_default()
                .push_back((id, received));
            inner.adjust(&dest, |c| {
                c.scheduled -= 1;
                c.ready += 1;
            });
            moved += 1;
        }
        if moved > 0 {
            inner.publish();
        }
        moved
    }

    /// When the next scheduled message comes due, if any.
    pub fn next_due(&self) -> Option<u64> {
        self.lock().timer.first_key_value().map(|(k, _)| k.0)
    }

    /// Destinations with ready messages, with their ready and in-flight counts.
    pub fn ready_destinations(&self) -> Vec<(String, usize, usize)> {
        let inner = self.lock();
        inner
            .ready
            .iter()
            .filter(|(_, q)| !q.is_empty())
            .map(|(d, q)| {
                let in_flight = inner.counts.get(d).map_or(0, |c| c.in_flight);
                (d.to_string(), q.len(), in_flight)
            })
            .collect()
    }

    /// Takes the next ready message of `destination`; it counts as in flight until [`Scheduler::finish`].
    pub fn pop_ready(&self, destination: &str) -> Option<MessageId> {
        let mut inner = self.lock();
        let (dest, queue) = inner.ready.get_key_value(destination)?;
        let dest = Arc::clone(dest);
        let _ = queue;
        let queue = inner.ready.get_mut(destination)?;
        let (id, _) = queue.pop_front()?;
        if queue.is_empty() {
            inner.ready.remove(destination);
        }
        inner.adjust(&dest, |c| {
            c.ready -= 1;
            c.in_flight += 1;
        });
        inner.publish();
        Some(id)
    }

    /// Ends the in-flight state of a message taken with [`Scheduler::pop_ready`]. It is then
    /// either gone (final) or re-entered with [`Scheduler::schedule`].
    pub fn finish(&self, id: MessageId, destination: &str) {
        let mut inner = self.lock();
        inner.received.remove(&id);
        let dest = inner.intern(destination);
        inner.adjust(&dest, |c| c.in_flight = c.in_flight.saturating_sub(1));
        inner.publish();
    }

    /// Removes every ready and scheduled message of `destination` (for purge); returns their ids.
    pub fn drain_destination(&self, destination: &str) -> Vec<MessageId> {
        let mut inner = self.lock();
        let mut ids: Vec<MessageId> = inner
            .ready
            .remove(destination)
            .map(|q| q.into_iter().map(|(id, _)| id).collect())
            .unwrap_or_default();
        let scheduled: Vec<(u64, MessageId)> = inner
            .timer
            .iter()
            .filter(|(_, d)| &***d == destination)
            .map(|(k, _)| *k)
            .collect();
        for key in &scheduled {
            inner.timer.remove(key);
        }
        ids.extend(scheduled.iter().map(|(_, id)| *id));
        let dest = inner.intern(destination);
        let (ready, sched) = (ids.len() - scheduled.len(), scheduled.len());
        inner.adjust(&dest, |c| {
            c.ready -= ready;
            c.scheduled -= sched;
        });
        for id in &ids {
            inner.received.remove(id);
        }
        inner.publish();
        ids
    }

    /// Counts per destination (ready, scheduled, in flight, oldest).
    pub fn destinations(&self) -> Vec<(String, DestinationCounts)> {
        let inner = self.lock();
        let mut oldest: HashMap<&str, u64> = HashMap::new();
        for q in inner.ready.iter() {
            if let Some(min) = q.1.iter().map(|(_, r)| *r).min() {
                oldest.insert(q.0, min);
            }
        }
        for ((_, id), dest) in inner.timer.iter() {
            if let Some(r) = inner.received.get(id) {
                let e = oldest.entry(dest).or_insert(*r);
                *e = (*e).min(*r);
            }
        }
        let mut out: Vec<(String, DestinationCounts)> = inner
            .counts
            .iter()
            .map(|(d, c)| {
                let mut c = c.clone();
                c.oldest_received_ms = oldest.get(&**d).copied();
                (d.to_string(), c)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Totals over every destination.
    pub fn totals(&self) -> DestinationCounts {
        self.lock().totals.clone()
    }

    /// Waits until something is scheduled or made ready.
    pub async fn changed(&self) {
        self.notify.notified().await
    }

    /// Wakes the waiter of [`Scheduler::changed`] (e.g. a worker slot freed up).
    pub fn wake(&self) {
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_messages_move_to_ready_in_order() {
        let s = Scheduler::new();
        let (a, b, c) = (
            MessageId::generate(),
            MessageId::generate(),
            MessageId::generate(),
        );
        s.schedule(a, "x.test", 100, 1, 50);
        s.schedule(b, "x.test", 200, 2, 50);
        s.schedule(c, "y.test", 10, 3, 50);
        assert_eq!(s.totals().scheduled, 2);
        assert_eq!(s.totals().ready, 1);
        assert_eq!(s.next_due(), Some(100));
        assert_eq!(s.promote(150), 1);
        assert_eq!(s.pop_ready("x.test"), Some(a));
        assert_eq!(s.pop_ready("x.test"), None);
        assert_eq!(s.totals().in_flight, 1);
        s.finish(a, "x.test");
        assert_eq!(s.totals().in_flight, 0);
        let dests = s.destinations();
        assert_eq!(dests.len(), 2);
        assert_eq!(dests[0].0, "x.test");
        assert_eq!(dests[0].1.scheduled, 1);
        assert_eq!(dests[0].1.oldest_received_ms, Some(2));
        assert_eq!(s.drain_destination("x.test"), vec![b]);
        assert_eq!(s.totals().scheduled, 0);
        assert_eq!(s.destinations().len(), 1);
    }
}
