//! The in-memory schedule: a timer of deferred messages and a ready queue per destination,
//! plus operator holds (suspended destinations and campaigns).
//!
//! Only ids, destination keys and campaign names (interned) and times live here; metadata and
//! bodies stay in the spool, so a queued message costs on the order of 150 bytes of memory.
//!
//! Every message known to the schedule is in exactly one state: scheduled (in the timer),
//! ready (in its destination's ready queue), in flight (taken by a worker), or parked (its
//! campaign is suspended). The per-destination counts and totals are kept in step with those
//! moves and published as the `drover_queue_messages{state}` gauges.

use crate::MessageId;
use queue_key::QueueKey;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
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
    /// Held because their campaign is suspended.
    pub parked: usize,
    /// Earliest reception time among the messages counted here (ms since epoch).
    pub oldest_received_ms: Option<u64>,
    /// The destination is suspended until this time (ms since epoch; `u64::MAX` = until resumed).
    pub suspended_until_ms: Option<u64>,
}

impl DestinationCounts {
    fn is_empty(&self) -> bool {
        self.ready == 0 && self.scheduled == 0 && self.in_flight == 0 && self.parked == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Scheduled(u64),
    Ready,
    InFlight,
    Parked,
}

struct Entry {
    dest: Arc<QueueKey>,
    campaign: Option<Arc<str>>,
    received_ms: u64,
    state: State,
}

/// What an operator action selects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "name")]
pub enum Selector {
    /// One destination (recipient domain or site).
    Domain(String),
    /// One campaign.
    Campaign(String),
}

#[derive(Default)]
struct Inner {
    entries: HashMap<MessageId, Entry>,
    timer: BTreeSet<(u64, MessageId)>,
    /// Ordered by key (name, then source), so the dispatcher can walk the queues round-robin
    /// from where it stopped ([`Scheduler::ready_after`]).
    ready: BTreeMap<Arc<QueueKey>, VecDeque<MessageId>>,
    /// Interned campaign names and held domain names.
    names: HashSet<Arc<str>>,
    /// Interned queue keys.
    keys: HashSet<Arc<QueueKey>>,
    counts: HashMap<Arc<QueueKey>, DestinationCounts>,
    totals: DestinationCounts,
    /// Holds by domain (or site) name: every queue of the name, whatever its source.
    suspended_dests: HashMap<Arc<str>, u64>,
    /// Holds of one egress source's queue of a domain ([`Scheduler::suspend_queue`]).
    suspended_queues: HashMap<Arc<QueueKey>, u64>,
    suspended_campaigns: HashMap<Arc<str>, u64>,
    /// While a spool reload runs: the messages finished since it began (see
    /// [`Scheduler::begin_reload`]).
    finished_during_reload: Option<HashSet<MessageId>>,
}

fn bump(c: &mut DestinationCounts, state: State, delta: isize) {
    let field = match state {
        State::Scheduled(_) => &mut c.scheduled,
        State::Ready => &mut c.ready,
        State::InFlight => &mut c.in_flight,
        State::Parked => &mut c.parked,
    };
    *field = field.saturating_add_signed(delta);
}

impl Inner {
    fn knows(&self, id: &MessageId) -> bool {
        self.entries.contains_key(id)
            || self
                .finished_during_reload
                .as_ref()
                .is_some_and(|f| f.contains(id))
    }

    /// Puts a new or in-flight message in its place for `due_ms`.
    fn place(
        &mut self,
        id: MessageId,
        destination: &QueueKey,
        campaign: Option<&str>,
        due_ms: u64,
        received_ms: u64,
        now_ms: u64,
    ) {
        let dest = self.intern_key(destination);
        let campaign = campaign.map(|c| self.intern(c));
        if let std::collections::hash_map::Entry::Vacant(slot) = self.entries.entry(id) {
            // Counted as in flight for one instant so `set_state` can do the bookkeeping.
            slot.insert(Entry {
                dest: Arc::clone(&dest),
                campaign,
                received_ms,
                state: State::InFlight,
            });
            self.count(&dest, State::InFlight, 1);
        }
        let to = if due_ms <= now_ms {
            self.due_state(&id, now_ms)
        } else {
            State::Scheduled(due_ms)
        };
        self.set_state(id, to);
        self.publish();
    }

    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.get(name) {
            return Arc::clone(n);
        }
        let n: Arc<str> = Arc::from(name);
        self.names.insert(Arc::clone(&n));
        n
    }

    fn intern_key(&mut self, key: &QueueKey) -> Arc<QueueKey> {
        if let Some(k) = self.keys.get(key) {
            return Arc::clone(k);
        }
        let k = Arc::new(key.clone());
        self.keys.insert(Arc::clone(&k));
        k
    }

    fn count(&mut self, dest: &Arc<QueueKey>, state: State, delta: isize) {
        bump(&mut self.totals, state, delta);
        let c = self.counts.entry(Arc::clone(dest)).or_default();
        bump(c, state, delta);
        if c.is_empty() {
            self.counts.remove(dest);
        }
    }

    /// Moves an entry to `to`, keeping the containers and counts in step. The caller has
    /// already taken it out of the container of its old state where that matters.
    fn set_state(&mut self, id: MessageId, to: State) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let from = entry.state;
        entry.state = to;
        let dest = Arc::clone(&entry.dest);
        if let State::Scheduled(due) = from {
            self.timer.remove(&(due, id));
        }
        match to {
            State::Scheduled(due) => {
                self.timer.insert((due, id));
            }
            State::Ready => self
                .ready
                .entry(Arc::clone(&dest))
                .or_default()
                .push_back(id),
            State::InFlight | State::Parked => {}
        }
        self.count(&dest, from, -1);
        self.count(&dest, to, 1);
    }

    /// Until when a queue is held, by a hold of its own or of its domain (the later one).
    fn held_until(&self, dest: &QueueKey, now_ms: u64) -> Option<u64> {
        [
            self.suspended_queues.get(dest),
            self.suspended_dests.get(dest.name()),
        ]
        .into_iter()
        .flatten()
        .copied()
        .filter(|until| *until > now_ms)
        .max()
    }

    /// Whether a queue is held: by a hold of its own or of its domain.
    fn dest_held(&self, dest: &QueueKey, now_ms: u64) -> bool {
        self.held_until(dest, now_ms).is_some()
    }

    fn campaign_held(&self, campaign: &Option<Arc<str>>, now_ms: u64) -> bool {
        campaign
            .as_ref()
            .and_then(|c| self.suspended_campaigns.get(c))
            .is_some_and(|until| *until > now_ms)
    }

    /// Where a message that is due goes: its ready queue, or parked if its campaign is held.
    fn due_state(&self, id: &MessageId, now_ms: u64) -> State {
        match self.entries.get(id) {
            Some(e) if self.campaign_held(&e.campaign, now_ms) => State::Parked,
            _ => State::Ready,
        }
    }

    fn remove_from_ready(&mut self, dest: &Arc<QueueKey>, ids: &HashSet<MessageId>) {
        if let Some(q) = self.ready.get_mut(dest) {
            q.retain(|id| !ids.contains(id));
            if q.is_empty() {
                self.ready.remove(dest);
            }
        }
    }

    fn publish(&self) {
        let t = &self.totals;
        metrics::gauge!(QUEUE_GAUGE, "state" => "scheduled").set((t.scheduled + t.parked) as f64);
        metrics::gauge!(QUEUE_GAUGE, "state" => "ready").set(t.ready as f64);
        metrics::gauge!(QUEUE_GAUGE, "state" => "in_flight").set(t.in_flight as f64);
    }

    fn matching(&self, selector: &Selector) -> Vec<MessageId> {
        self.entries
            .iter()
            .filter(|(_, e)| match selector {
                Selector::Domain(d) => e.dest.name() == d.as_str(),
                Selector::Campaign(c) => e.campaign.as_deref() == Some(c.as_str()),
            })
            .map(|(id, _)| *id)
            .collect()
    }
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
    /// An in-flight message (its attempt is over) is placed again; a message already queued
    /// is left where it is. Returns whether the message was placed.
    pub fn schedule(
        &self,
        id: MessageId,
        destination: &QueueKey,
        campaign: Option<&str>,
        due_ms: u64,
        received_ms: u64,
        now_ms: u64,
    ) -> bool {
        {
            let mut inner = self.lock();
            if let Some(e) = inner.entries.get(&id) {
                if e.state != State::InFlight {
                    return false;
                }
            }
            inner.place(id, destination, campaign, due_ms, received_ms, now_ms);
        }
        self.notify.notify_one();
        true
    }

    /// Starts a spool reload. Until [`Scheduler::end_reload`] the scheduler remembers the
    /// messages it finishes, so that a reload that read a message from disk before its
    /// delivery ended cannot bring it back (see [`Scheduler::restore`]).
    pub fn begin_reload(&self) {
        self.lock().finished_during_reload = Some(HashSet::new());
    }

    /// Ends a spool reload and forgets what was finished meanwhile.
    pub fn end_reload(&self) {
        self.lock().finished_during_reload = None;
    }

    /// Queues a message a spool reload found, unless this process already has it in hand:
    /// queued, in flight (a reload must never hand an in-flight message to a second
    /// worker), or finished since the reload began. Returns whether it was queued.
    pub fn restore(
        &self,
        id: MessageId,
        destination: &QueueKey,
        campaign: Option<&str>,
        due_ms: u64,
        received_ms: u64,
        now_ms: u64,
    ) -> bool {
        {
            let mut inner = self.lock();
            if inner.knows(&id) {
                return false;
            }
            inner.place(id, destination, campaign, due_ms, received_ms, now_ms);
        }
        self.notify.notify_one();
        true
    }

    /// Whether this process has the message in hand: queued, in flight, or finished since
    /// the running reload began. (Only tests ask from outside the lock.)
    #[cfg(test)]
    fn knows(&self, id: MessageId) -> bool {
        self.lock().knows(&id)
    }

    /// Moves every message due at `now_ms` from the timer to its ready queue (or parks it when
    /// its campaign is held); lifts holds that have expired. Returns how many moved.
    pub fn promote(&self, now_ms: u64) -> usize {
        let mut inner = self.lock();
        let mut moved = 0;
        let expired: Vec<Arc<str>> = inner
            .suspended_campaigns
            .iter()
            .filter(|(_, until)| **until <= now_ms)
            .map(|(c, _)| Arc::clone(c))
            .collect();
        for c in expired {
            inner.suspended_campaigns.remove(&c);
            moved += unpark(&mut inner, &c, now_ms);
        }
        inner.suspended_dests.retain(|_, until| *until > now_ms);
        inner.suspended_queues.retain(|_, until| *until > now_ms);
        while let Some(&(due, id)) = inner.timer.first() {
            if due > now_ms {
                break;
            }
            let to = inner.due_state(&id, now_ms);
            inner.set_state(id, to);
            moved += 1;
        }
        if moved > 0 {
            inner.publish();
        }
        moved
    }

    /// When the next scheduled message comes due, if any.
    pub fn next_due(&self) -> Option<u64> {
        self.lock().timer.first().map(|k| k.0)
    }

    /// Destinations that have ready messages and are not suspended, with their ready counts.
    pub fn ready_destinations(&self, now_ms: u64) -> Vec<(QueueKey, usize)> {
        let inner = self.lock();
        inner
            .ready
            .iter()
            .filter(|(d, q)| !q.is_empty() && !inner.dest_held(d, now_ms))
            .map(|(d, q)| (QueueKey::clone(d), q.len()))
            .collect()
    }

    /// Up to `limit` destinations with ready messages that are not suspended, with their
    /// ready counts, in key order (name, then source) after `after` (from the first without
    /// it). The dispatcher walks the queues with this round-robin, so each pass costs what it
    /// looks at, not the number of queues.
    pub fn ready_after(
        &self,
        after: Option<&QueueKey>,
        limit: usize,
        now_ms: u64,
    ) -> Vec<(QueueKey, usize)> {
        let inner = self.lock();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        inner
            .ready
            .range::<QueueKey, _>((lower, Bound::Unbounded))
            .filter(|(d, q)| !q.is_empty() && !inner.dest_held(d, now_ms))
            .take(limit)
            .map(|(d, q)| (QueueKey::clone(d), q.len()))
            .collect()
    }

    /// Whether `destination` has a message ready (and is not suspended). (Only tests ask:
    /// workers simply try `pop_ready`.)
    #[cfg(test)]
    fn has_ready(&self, destination: &QueueKey, now_ms: u64) -> bool {
        let inner = self.lock();
        inner.ready.get(destination).is_some_and(|q| !q.is_empty())
            && !inner.dest_held(destination, now_ms)
    }

    /// Takes the next ready message of `destination`; it is in flight until it is scheduled
    /// again or [`Scheduler::finish`]ed. Suspended destinations yield nothing.
    pub fn pop_ready(&self, destination: &QueueKey, now_ms: u64) -> Option<MessageId> {
        let mut inner = self.lock();
        if inner.dest_held(destination, now_ms) {
            return None;
        }
        let queue = inner.ready.get_mut(destination)?;
        let id = queue.pop_front()?;
        if queue.is_empty() {
            inner.ready.remove(destination);
        }
        // Already out of the ready queue: only the state and the counts change.
        if let Some(e) = inner.entries.get_mut(&id) {
            let dest = Arc::clone(&e.dest);
            e.state = State::InFlight;
            inner.count(&dest, State::Ready, -1);
            inner.count(&dest, State::InFlight, 1);
        }
        inner.publish();
        Some(id)
    }

    /// Forgets a message (delivered, bounced, expired or purged), whatever its state.
    pub fn finish(&self, id: MessageId) {
        let mut inner = self.lock();
        forget(&mut inner, id);
        inner.publish();
    }

    /// Removes every message `selector` matches from the schedule and returns their ids (for
    /// purge). In-flight messages are not returned: their workers finish them. One pass over
    /// the entries and one over each affected ready queue, so taking 100 000 messages costs
    /// milliseconds of lock time, not a scan of the queue per message.
    pub fn take(&self, selector: &Selector) -> Vec<MessageId> {
        let mut inner = self.lock();
        let ids: Vec<MessageId> = inner
            .matching(selector)
            .into_iter()
            .filter(|id| {
                inner
                    .entries
                    .get(id)
                    .is_some_and(|e| e.state != State::InFlight)
            })
            .collect();
        let mut ready: HashMap<Arc<QueueKey>, HashSet<MessageId>> = HashMap::new();
        for id in &ids {
            let Some(entry) = inner.entries.remove(id) else {
                continue;
            };
            if let Some(finished) = &mut inner.finished_during_reload {
                finished.insert(*id);
            }
            match entry.state {
                State::Scheduled(due) => {
                    inner.timer.remove(&(due, *id));
                }
                State::Ready => {
                    ready
                        .entry(Arc::clone(&entry.dest))
                        .or_default()
                        .insert(*id);
                }
                State::InFlight | State::Parked => {}
            }
            inner.count(&entry.dest, entry.state, -1);
        }
        for (dest, ids) in ready {
            inner.remove_from_ready(&dest, &ids);
        }
        inner.publish();
        ids
    }

    /// Puts an in-flight message back on the timer for `due_ms` without touching its
    /// destination or campaign (e.g. its spool record could not be read just now).
    pub fn defer(&self, id: MessageId, due_ms: u64) {
        let mut inner = self.lock();
        if inner
            .entries
            .get(&id)
            .is_some_and(|e| e.state == State::InFlight)
        {
            inner.set_state(id, State::Scheduled(due_ms));
            inner.publish();
        }
    }

    /// Drops interned destination keys and campaign names nothing refers to any more, so a
    /// long-running engine that has seen millions of domains does not keep them all.
    /// Returns how many were dropped.
    pub fn compact(&self) -> usize {
        let mut inner = self.lock();
        let before = inner.names.len() + inner.keys.len();
        // Held only by the set itself: no entry, count, ready queue or hold uses it.
        inner.names.retain(|n| Arc::strong_count(n) > 1);
        inner.keys.retain(|k| Arc::strong_count(k) > 1);
        inner.counts.shrink_to_fit();
        before - inner.names.len() - inner.keys.len()
    }

    /// Interned keys and names held (for tests and the memory view).
    pub fn interned(&self) -> usize {
        let inner = self.lock();
        inner.names.len() + inner.keys.len()
    }

    /// Makes every scheduled message `selector` matches due now; returns how many.
    pub fn retry_now(&self, selector: &Selector, now_ms: u64) -> usize {
        let count = {
            let mut inner = self.lock();
            let ids: Vec<MessageId> = inner
                .matching(selector)
                .into_iter()
                .filter(|id| {
                    inner
                        .entries
                        .get(id)
                        .is_some_and(|e| matches!(e.state, State::Scheduled(_)))
                })
                .collect();
            for id in &ids {
                let to = inner.due_state(id, now_ms);
                inner.set_state(*id, to);
            }
            inner.publish();
            ids.len()
        };
        self.notify.notify_one();
        count
    }

    /// Holds a destination or campaign until `until_ms` (`u64::MAX`: until resumed).
    /// Messages stay queued; held campaigns' messages are parked instead of delivered.
    pub fn suspend(&self, selector: &Selector, until_ms: u64, now_ms: u64) {
        let mut inner = self.lock();
        match selector {
            Selector::Domain(d) => {
                let d = inner.intern(d);
                inner.suspended_dests.insert(d, until_ms);
            }
            Selector::Campaign(c) => {
                let c = inner.intern(c);
                inner.suspended_campaigns.insert(Arc::clone(&c), until_ms);
                let ready: Vec<MessageId> = inner
                    .entries
                    .iter()
                    .filter(|(_, e)| e.state == State::Ready && e.campaign.as_ref() == Some(&c))
                    .map(|(id, _)| *id)
                    .collect();
                let mut by_dest: HashMap<Arc<QueueKey>, HashSet<MessageId>> = HashMap::new();
                for id in &ready {
                    if let Some(e) = inner.entries.get(id) {
                        by_dest.entry(Arc::clone(&e.dest)).or_default().insert(*id);
                    }
                }
                for (dest, ids) in by_dest {
                    inner.remove_from_ready(&dest, &ids);
                }
                for id in ready {
                    // Out of the ready queue already; `set_state` only moves the counts.
                    if let Some(e) = inner.entries.get_mut(&id) {
                        e.state = State::Parked;
                        let dest = Arc::clone(&e.dest);
                        inner.count(&dest, State::Ready, -1);
                        inner.count(&dest, State::Parked, 1);
                    }
                }
                let _ = now_ms;
            }
        }
        inner.publish();
    }

    /// Holds one queue until `until_ms`: a domain's mail from one egress source (automation
    /// reacting to what a receiver said to that source), while its other sources flow. A
    /// queue without a source is held as its domain is by [`Selector::Domain`]. Resuming the
    /// domain lifts it.
    pub fn suspend_queue(&self, queue: &QueueKey, until_ms: u64) {
        let mut inner = self.lock();
        if queue.source().is_some() {
            let q = inner.intern_key(queue);
            inner.suspended_queues.insert(q, until_ms);
        } else {
            let d = inner.intern(queue.name());
            inner.suspended_dests.insert(d, until_ms);
        }
    }

    /// Lifts a hold (for a domain, also the holds of its sources' queues); returns whether
    /// there was one.
    pub fn resume(&self, selector: &Selector, now_ms: u64) -> bool {
        let was = {
            let mut inner = self.lock();
            let was = match selector {
                Selector::Domain(d) => {
                    let queues = inner.suspended_queues.len();
                    inner.suspended_queues.retain(|q, _| q.name() != d.as_str());
                    let domain = inner.suspended_dests.remove(d.as_str()).is_some();
                    domain || inner.suspended_queues.len() < queues
                }
                Selector::Campaign(c) => {
                    let was = inner.suspended_campaigns.remove(c.as_str()).is_some();
                    let c = inner.intern(c);
                    unpark(&mut inner, &c, now_ms);
                    was
                }
            };
            inner.publish();
            was
        };
        self.notify.notify_one();
        was
    }

    /// The holds in force: `(selector, until_ms)`.
    pub fn suspensions(&self, now_ms: u64) -> Vec<(Selector, u64)> {
        let inner = self.lock();
        let mut out: Vec<(Selector, u64)> = inner
            .suspended_dests
            .iter()
            .filter(|(_, u)| **u > now_ms)
            .map(|(d, u)| (Selector::Domain(d.to_string()), *u))
            .chain(
                inner
                    .suspended_queues
                    .iter()
                    .filter(|(_, u)| **u > now_ms)
                    // Shown as operators see the queue in the listing.
                    .map(|(q, u)| (Selector::Domain(q.to_string()), *u)),
            )
            .chain(
                inner
                    .suspended_campaigns
                    .iter()
                    .filter(|(_, u)| **u > now_ms)
                    .map(|(c, u)| (Selector::Campaign(c.to_string()), *u)),
            )
            .collect();
        out.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
        out
    }

    /// Counts per destination.
    pub fn destinations(&self, now_ms: u64) -> Vec<(QueueKey, DestinationCounts)> {
        let inner = self.lock();
        let mut oldest: HashMap<&Arc<QueueKey>, u64> = HashMap::new();
        for e in inner.entries.values() {
            let o = oldest.entry(&e.dest).or_insert(e.received_ms);
            *o = (*o).min(e.received_ms);
        }
        let mut out: Vec<(QueueKey, DestinationCounts)> = inner
            .counts
            .iter()
            .map(|(d, c)| {
                let mut c = c.clone();
                c.oldest_received_ms = oldest.get(d).copied();
                c.suspended_until_ms = inner.held_until(d, now_ms);
                (QueueKey::clone(d), c)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Totals over every destination.
    pub fn totals(&self) -> DestinationCounts {
        self.lock().totals.clone()
    }

    /// Messages known to the schedule (all states).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no message is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

fn forget(inner: &mut Inner, id: MessageId) {
    let Some(entry) = inner.entries.remove(&id) else {
        return;
    };
    if let Some(finished) = &mut inner.finished_during_reload {
        finished.insert(id);
    }
    match entry.state {
        State::Scheduled(due) => {
            inner.timer.remove(&(due, id));
        }
        State::Ready => {
            inner.remove_from_ready(&entry.dest, &HashSet::from([id]));
        }
        State::InFlight | State::Parked => {}
    }
    inner.count(&entry.dest, entry.state, -1);
}

fn unpark(inner: &mut Inner, campaign: &Arc<str>, now_ms: u64) -> usize {
    let parked: Vec<MessageId> = inner
        .entries
        .iter()
        .filter(|(_, e)| e.state == State::Parked && e.campaign.as_ref() == Some(campaign))
        .map(|(id, _)| *id)
        .collect();
    for id in &parked {
        let to = inner.due_state(id, now_ms);
        inner.set_state(*id, to);
    }
    parked.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str) -> QueueKey {
        QueueKey::new(name)
    }

    #[test]
    fn a_reload_never_brings_back_an_in_flight_or_finished_message() {
        let s = Scheduler::new();
        s.begin_reload();
        let (a, b, c) = (
            MessageId::generate(),
            MessageId::generate(),
            MessageId::generate(),
        );
        s.schedule(a, &q("x.test"), None, 10, 1, 50);
        s.schedule(b, &q("x.test"), None, 10, 1, 50);
        assert_eq!(s.pop_ready(&q("x.test"), 50), Some(a));
        assert_eq!(s.pop_ready(&q("x.test"), 50), Some(b));
        s.finish(b);
        // The reload read both before the worker got them: neither comes back, and the
        // in-flight one stays with its worker instead of going to a second one.
        assert!(!s.restore(a, &q("x.test"), None, 10, 1, 50));
        assert!(!s.restore(b, &q("x.test"), None, 10, 1, 50));
        assert_eq!(s.totals().in_flight, 1);
        assert_eq!(s.totals().ready, 0);
        assert!(s.knows(a) && s.knows(b) && !s.knows(c));
        assert!(s.restore(c, &q("x.test"), None, 10, 1, 50));
        assert!(!s.restore(c, &q("x.test"), None, 10, 1, 50));
        assert_eq!(s.totals().ready, 1);
        s.end_reload();
        // Outside a reload nothing is remembered about finished messages.
        assert!(!s.knows(b));
        s.finish(a);
        assert!(!s.knows(a));
    }

    #[test]
    fn due_messages_move_to_ready_in_order() {
        let s = Scheduler::new();
        let (a, b, c) = (
            MessageId::generate(),
            MessageId::generate(),
            MessageId::generate(),
        );
        s.schedule(a, &q("x.test"), None, 100, 1, 50);
        s.schedule(b, &q("x.test"), None, 200, 2, 50);
        s.schedule(c, &q("y.test"), None, 10, 3, 50);
        assert_eq!(s.totals().scheduled, 2);
        assert_eq!(s.totals().ready, 1);
        assert_eq!(s.next_due(), Some(100));
        assert_eq!(s.promote(150), 1);
        assert_eq!(s.pop_ready(&q("x.test"), 150), Some(a));
        assert_eq!(s.pop_ready(&q("x.test"), 150), None);
        assert_eq!(s.totals().in_flight, 1);
        // Rescheduling an in-flight message moves it back to the timer.
        s.schedule(a, &q("x.test"), None, 300, 1, 150);
        assert_eq!(s.totals().in_flight, 0);
        assert_eq!(s.totals().scheduled, 2);
        let dests = s.destinations(150);
        assert_eq!(dests.len(), 2);
        assert_eq!(dests[0].0, q("x.test"));
        assert_eq!(dests[0].1.scheduled, 2);
        assert_eq!(dests[0].1.oldest_received_ms, Some(1));
        let mut taken = s.take(&Selector::Domain("x.test".into()));
        taken.sort();
        assert_eq!(taken, vec![a, b]);
        assert_eq!(s.totals().scheduled, 0);
        assert_eq!(s.destinations(150).len(), 1);
        s.finish(c);
        assert!(s.is_empty());
        assert_eq!(s.totals(), DestinationCounts::default());
    }

    #[test]
    fn suspended_destinations_and_campaigns_hold_their_messages() {
        let s = Scheduler::new();
        let (a, b, c) = (
            MessageId::generate(),
            MessageId::generate(),
            MessageId::generate(),
        );
        s.schedule(a, &q("x.test"), Some("nov"), 0, 0, 10);
        s.schedule(b, &q("x.test"), Some("dec"), 0, 0, 10);
        s.schedule(c, &q("y.test"), Some("nov"), 50, 0, 10);
        s.suspend(&Selector::Domain("x.test".into()), u64::MAX, 10);
        assert!(s.ready_destinations(10).is_empty());
        assert_eq!(s.pop_ready(&q("x.test"), 10), None);
        s.resume(&Selector::Domain("x.test".into()), 10);
        assert_eq!(s.ready_destinations(10), vec![(q("x.test"), 2)]);
        s.suspend(&Selector::Campaign("nov".into()), 1000, 10);
        assert_eq!(s.totals().parked, 1);
        assert_eq!(s.totals().ready, 1);
        // c comes due while its campaign is held: parked, not ready.
        s.promote(60);
        assert_eq!(s.totals().parked, 2);
        assert_eq!(s.pop_ready(&q("x.test"), 60), Some(b));
        assert_eq!(s.pop_ready(&q("y.test"), 60), None);
        // The hold expires by itself.
        s.promote(1000);
        assert_eq!(s.totals().parked, 0);
        assert_eq!(s.totals().ready, 2);
        s.suspend(&Selector::Campaign("nov".into()), u64::MAX, 1000);
        assert_eq!(s.suspensions(1000).len(), 1);
        assert!(s.resume(&Selector::Campaign("nov".into()), 1000));
        assert_eq!(s.totals().ready, 2);
        assert!(s.suspensions(1000).is_empty());
    }

    #[test]
    fn a_domain_hold_covers_its_per_source_queues() {
        let s = Scheduler::new();
        let a = MessageId::generate();
        let key = QueueKey::with_source("x.test", Some("ip1"));
        assert_eq!((key.name(), key.source()), ("x.test", Some("ip1")));
        s.schedule(a, &key, None, 0, 0, 10);
        s.suspend(&Selector::Domain("x.test".into()), u64::MAX, 10);
        assert!(!s.has_ready(&key, 10));
        assert_eq!(s.destinations(10)[0].1.suspended_until_ms, Some(u64::MAX));
        s.resume(&Selector::Domain("x.test".into()), 10);
        assert_eq!(s.pop_ready(&key, 10), Some(a));
        s.finish(a);
        s.schedule(a, &key, None, 50, 0, 10);
        assert_eq!(s.take(&Selector::Domain("x.test".into())), vec![a]);
    }

    #[test]
    fn taking_a_large_ready_queue_is_one_pass() {
        // One scan of the queue per taken id made this quadratic: minutes at this size.
        let s = Scheduler::new();
        let ids: Vec<MessageId> = (0..200_000).map(|_| MessageId::generate()).collect();
        for id in &ids {
            s.schedule(*id, &q("big.test"), None, 0, 0, 10);
        }
        let keep = MessageId::generate();
        s.schedule(keep, &q("big.test"), Some("other"), 0, 0, 10);
        let started = std::time::Instant::now();
        let taken = s.take(&Selector::Domain("big.test".into()));
        assert_eq!(taken.len(), 200_001);
        assert!(s.is_empty());
        assert_eq!(s.totals(), DestinationCounts::default());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn deferring_an_in_flight_message_keeps_it_scheduled() {
        let s = Scheduler::new();
        let a = MessageId::generate();
        s.schedule(a, &q("x.test"), Some("nov"), 0, 0, 10);
        assert_eq!(s.pop_ready(&q("x.test"), 10), Some(a));
        s.defer(a, 500);
        assert_eq!(s.totals().scheduled, 1);
        assert_eq!(s.totals().in_flight, 0);
        assert_eq!(s.next_due(), Some(500));
        s.promote(500);
        assert_eq!(s.pop_ready(&q("x.test"), 500), Some(a));
        // A queued message is not moved by a late defer.
        s.schedule(a, &q("x.test"), Some("nov"), 0, 0, 10);
        s.defer(a, 900);
        assert_eq!(s.totals().ready, 1);
    }

    #[test]
    fn names_nothing_uses_are_dropped() {
        let s = Scheduler::new();
        let ids: Vec<MessageId> = (0..100).map(|_| MessageId::generate()).collect();
        for (i, id) in ids.iter().enumerate() {
            s.schedule(*id, &q(&format!("d{i}.test")), Some("c"), 0, 0, 10);
        }
        s.suspend(&Selector::Domain("held.test".into()), u64::MAX, 10);
        assert_eq!(s.interned(), 102);
        assert_eq!(s.compact(), 0, "every name is in use");
        for id in &ids {
            s.finish(*id);
        }
        assert_eq!(s.compact(), 101);
        // The campaign's and the held domain's names were in use until now; the hold stays.
        assert_eq!(s.interned(), 1);
        assert!(!s
            .ready_destinations(10)
            .iter()
            .any(|(d, _)| d.name() == "held.test"));
        assert_eq!(s.suspensions(10).len(), 1);
    }

    #[test]
    fn ready_queues_are_walked_in_turn_from_a_cursor() {
        let s = Scheduler::new();
        for d in ["a.test", "b.test", "c.test", "d.test"] {
            s.schedule(MessageId::generate(), &q(d), None, 0, 0, 10);
        }
        s.schedule(MessageId::generate(), &q("b.test"), None, 0, 0, 10);
        s.suspend(&Selector::Domain("c.test".into()), u64::MAX, 10);
        let names = |v: Vec<(QueueKey, usize)>| {
            v.into_iter()
                .map(|(d, _)| d.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            s.ready_after(None, 2, 10),
            vec![(q("a.test"), 1), (q("b.test"), 2)]
        );
        // Held queues are skipped; the walk ends at the last name.
        assert_eq!(names(s.ready_after(Some(&q("b.test")), 2, 10)), ["d.test"]);
        assert!(s.ready_after(Some(&q("d.test")), 2, 10).is_empty());
        // A cursor that names no queue still orders the walk.
        assert_eq!(names(s.ready_after(Some(&q("aa")), 1, 10)), ["b.test"]);
    }

    #[test]
    fn the_queues_of_a_domain_are_walked_together_in_source_order() {
        let s = Scheduler::new();
        let keys = [
            QueueKey::with_source("a.test", Some("ip2")),
            QueueKey::new("a.testb"),
            QueueKey::with_source("a.test", Some("ip1")),
            QueueKey::new("a.test"),
        ];
        for k in &keys {
            s.schedule(MessageId::generate(), k, None, 0, 0, 10);
        }
        let shown = |v: Vec<(QueueKey, usize)>| {
            v.into_iter()
                .map(|(d, _)| d.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shown(s.ready_after(None, 10, 10)),
            ["a.test", "a.test|ip1", "a.test|ip2", "a.testb"]
        );
        assert_eq!(
            shown(s.ready_after(Some(&keys[2]), 10, 10)),
            ["a.test|ip2", "a.testb"]
        );
        // The listing is in the same order, and shows the keys as operators know them.
        let listed: Vec<String> = s
            .destinations(10)
            .into_iter()
            .map(|(d, _)| d.to_string())
            .collect();
        assert_eq!(listed, ["a.test", "a.test|ip1", "a.test|ip2", "a.testb"]);
    }

    #[test]
    fn a_queue_hold_holds_one_source_and_its_domain_resume_lifts_it() {
        let s = Scheduler::new();
        let ip1 = QueueKey::with_source("x.test", Some("ip1"));
        let ip2 = QueueKey::with_source("x.test", Some("ip2"));
        let (a, b) = (MessageId::generate(), MessageId::generate());
        s.schedule(a, &ip1, None, 0, 0, 10);
        s.schedule(b, &ip2, None, 0, 0, 10);
        s.suspend_queue(&ip1, 1000);
        assert!(!s.has_ready(&ip1, 10));
        assert_eq!(s.ready_destinations(10), vec![(ip2.clone(), 1)]);
        let dests = s.destinations(10);
        assert_eq!(dests[0].1.suspended_until_ms, Some(1000));
        assert_eq!(dests[1].1.suspended_until_ms, None);
        assert_eq!(
            s.suspensions(10),
            vec![(Selector::Domain("x.test|ip1".into()), 1000)]
        );
        // Another domain's resume leaves it; its domain's lifts it.
        assert!(!s.resume(&Selector::Domain("x.tes".into()), 10));
        assert!(!s.has_ready(&ip1, 10));
        assert!(s.resume(&Selector::Domain("x.test".into()), 10));
        assert!(s.suspensions(10).is_empty());
        assert_eq!(s.pop_ready(&ip1, 10), Some(a));
        // It expires by itself, too; a queue without a source is held as its domain is.
        s.schedule(a, &ip1, None, 0, 0, 10);
        s.suspend_queue(&ip1, 1000);
        s.promote(1000);
        assert!(s.has_ready(&ip1, 1000));
        assert!(s.suspensions(1000).is_empty());
        s.suspend_queue(&q("x.test"), u64::MAX);
        assert_eq!(
            s.suspensions(1000),
            vec![(Selector::Domain("x.test".into()), u64::MAX)]
        );
        assert!(!s.has_ready(&ip1, 1000) && !s.has_ready(&ip2, 1000));
    }

    #[test]
    fn retry_now_makes_scheduled_messages_ready() {
        let s = Scheduler::new();
        let a = MessageId::generate();
        s.schedule(a, &q("x.test"), Some("nov"), 10_000, 0, 10);
        assert_eq!(s.retry_now(&Selector::Campaign("nov".into()), 10), 1);
        assert_eq!(s.pop_ready(&q("x.test"), 10), Some(a));
        assert_eq!(s.retry_now(&Selector::Campaign("nov".into()), 10), 0);
    }
}
