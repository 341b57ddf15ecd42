//! The in-memory schedule: a timer of deferred messages and a ready queue per destination,
//! plus operator holds (suspended destinations and campaigns).
//!
//! Only ids, destination keys and campaign names (interned) and times live here; metadata and
//! bodies stay in the spool. A queued message costs one 36-byte map slot (the id, its
//! destination's and its (tenant, campaign) pair's interned indices, its state, priority and due time,
//! its reception second) and, while deferred, 16 bytes in a timer bucket (while ready, 16
//! bytes in its destination's fair queue, `crate::fair`): 100–130 bytes at a million queued,
//! hash-table slack included (measured by the scale and fair benches).
//!
//! Every message known to the schedule is in exactly one state: scheduled (in the timer),
//! ready (in its destination's ready queue), in flight (taken by a worker), or parked (its
//! campaign is suspended). The per-destination counts and totals are kept in step with those
//! moves and published as the `drover_queue_messages{state}` gauges.
//!
//! The timer keeps messages due in the next few seconds exactly ordered (`near`) and the rest
//! as plain id lists in buckets of [`TIMER_BUCKET_MS`] (`far`), moved into `near` as their
//! bucket comes up. A message leaving a far bucket early (retry now, purge) is not searched
//! for: its id stays behind, is recognised as stale (its entry is gone or scheduled for
//! another bucket) and dropped when the bucket comes up, or by a sweep once stale ids are
//! many.

use crate::fair::{Group, ReadyQueue};
use crate::{MessageId, Priority};
use queue_key::QueueKey;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

pub(crate) const QUEUE_GAUGE: &str = "drover_queue_messages";
/// Ready messages by priority (extension).
pub(crate) const READY_GAUGE: &str = "drover_queue_ready_messages";

/// Width of a far timer bucket.
pub(crate) const TIMER_BUCKET_MS: u64 = 4096;

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
    /// Earliest reception time among the messages counted here (ms since epoch, to the
    /// second).
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

/// No campaign.
const NO_CAMPAIGN: u32 = u32::MAX;
/// No tenant.
const NO_TENANT: u32 = u32::MAX;
const STATE_SHIFT: u32 = 30;
const PRIORITY_SHIFT: u32 = 28;
const DUE_HIGH_MASK: u32 = (1 << PRIORITY_SHIFT) - 1;

/// One message, in 20 bytes (4-byte aligned, so the map slot with its id is 36).
struct Entry {
    due_low: u32,
    /// The state in the top two bits, the priority in the next two, the due time's high bits
    /// below.
    due_high_state: u32,
    dest: u32,
    /// The interned (tenant, campaign) pair (`Inner::owners`): one index for both, as most
    /// queues hold few pairs.
    owner: u32,
    received_s: u32,
}

impl Entry {
    fn new(priority: Priority, dest: u32, owner: u32, received_ms: u64, state: State) -> Entry {
        let mut e = Entry {
            due_low: 0,
            due_high_state: (priority as u32) << PRIORITY_SHIFT,
            dest,
            owner,
            received_s: u32::try_from(received_ms / 1000).unwrap_or(u32::MAX),
        };
        e.set_state(state);
        e
    }

    fn priority(&self) -> Priority {
        match (self.due_high_state >> PRIORITY_SHIFT) & 3 {
            0 => Priority::High,
            2 => Priority::Low,
            _ => Priority::Normal,
        }
    }

    fn state(&self) -> State {
        let due = (u64::from(self.due_high_state & DUE_HIGH_MASK) << 32) | u64::from(self.due_low);
        match self.due_high_state >> STATE_SHIFT {
            0 => State::Scheduled(due),
            1 => State::Ready,
            2 => State::InFlight,
            _ => State::Parked,
        }
    }

    fn set_state(&mut self, state: State) {
        let (tag, due) = match state {
            // 60 bits of milliseconds: far beyond any date a retry schedule reaches.
            State::Scheduled(due) => (0, due.min((1 << 60) - 1)),
            State::Ready => (1, 0),
            State::InFlight => (2, 0),
            State::Parked => (3, 0),
        };
        let priority = self.due_high_state & (3 << PRIORITY_SHIFT);
        self.due_low = due as u32;
        self.due_high_state =
            (tag << STATE_SHIFT) | priority | ((due >> 32) as u32 & DUE_HIGH_MASK);
    }

    fn received_ms(&self) -> u64 {
        u64::from(self.received_s) * 1000
    }
}

/// Values shared by many messages (destination keys, campaign names), each stored once and
/// referred to by a `u32` index; counted, so a value goes when its last message does.
struct Interner<T: ?Sized> {
    slots: Vec<Option<(Arc<T>, u32)>>,
    index: HashMap<Arc<T>, u32>,
    free: Vec<u32>,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            slots: Vec::new(),
            index: HashMap::new(),
            free: Vec::new(),
        }
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    /// The index of `value`, taking a reference on it.
    fn acquire(&mut self, value: &T, make: impl FnOnce() -> Arc<T>) -> u32 {
        if let Some(&i) = self.index.get(value) {
            if let Some((_, refs)) = self.slots.get_mut(i as usize).and_then(Option::as_mut) {
                *refs += 1;
            }
            return i;
        }
        let arc = make();
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some((Arc::clone(&arc), 1));
                i
            }
            None => {
                self.slots.push(Some((Arc::clone(&arc), 1)));
                // Four billion distinct live values cannot fit in memory first.
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(arc, i);
        i
    }

    /// Drops a reference taken by [`Interner::acquire`].
    fn release(&mut self, i: u32) {
        let Some(slot) = self.slots.get_mut(i as usize) else {
            return;
        };
        let gone = match slot {
            Some((_, refs)) if *refs > 1 => {
                *refs -= 1;
                false
            }
            Some(_) => true,
            None => false,
        };
        if gone {
            if let Some((value, _)) = slot.take() {
                self.index.remove(&*value);
            }
            self.free.push(i);
        }
    }

    fn get(&self, i: u32) -> Option<&Arc<T>> {
        self.slots
            .get(i as usize)
            .and_then(Option::as_ref)
            .map(|(v, _)| v)
    }

    fn find(&self, value: &T) -> Option<u32> {
        self.index.get(value).copied()
    }

    fn len(&self) -> usize {
        self.index.len()
    }

    /// Gives back the memory of slots no value uses at the end; returns how many went.
    fn shrink(&mut self) -> usize {
        let before = self.slots.len();
        while matches!(self.slots.last(), Some(None)) {
            self.slots.pop();
        }
        let len = self.slots.len() as u32;
        self.free.retain(|i| *i < len);
        self.slots.shrink_to_fit();
        self.free.shrink_to_fit();
        self.index.shrink_to_fit();
        before - self.slots.len()
    }
}

/// A far timer bucket: the ids scheduled in its time span, in no order, stale ones included.
struct Bucket {
    ids: Vec<MessageId>,
    /// No id in the bucket is due before this (a stale one may have been the earliest).
    earliest: u64,
}

/// Who a message belongs to and how urgent it is: how it is served among its destination's
/// waiting mail (see `crate::fair`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tags<'a> {
    /// Campaign as injected.
    pub campaign: Option<&'a str>,
    /// Tenant as injected.
    pub tenant: Option<&'a str>,
    /// Priority as injected.
    pub priority: Priority,
}

/// Waiting mail of one tenant and campaign at one priority within a destination.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupCounts {
    /// Tenant, if any.
    pub tenant: Option<String>,
    /// Campaign, if any.
    pub campaign: Option<String>,
    /// Priority.
    pub priority: Priority,
    /// Ready messages.
    pub ready: usize,
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

/// Which queued messages a transfer to another instance takes (`drover drain`, KumoMTA's
/// xfer): each part given must match, and a filter with none matches every message.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Filter {
    /// Recipient domain (the queue's name, whatever its egress source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Campaign as injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// Tenant as injected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl Filter {
    /// Whether it selects every message.
    pub fn is_all(&self) -> bool {
        self.domain.is_none() && self.campaign.is_none() && self.tenant.is_none()
    }
}

struct Inner {
    entries: HashMap<MessageId, Entry>,
    /// Scheduled messages due up to the end of bucket `near_until`, exactly ordered.
    near: BTreeSet<(u64, MessageId)>,
    near_until: u64,
    /// Later ones, by bucket (due time / `bucket_ms`).
    far: BTreeMap<u64, Bucket>,
    bucket_ms: u64,
    /// Ids in `far` (stale ones included) and how many of them are stale.
    far_ids: usize,
    far_stale: usize,
    /// Ordered by key (name, then source), so the dispatcher can walk the queues round-robin
    /// from where it stopped ([`Scheduler::ready_after`]).
    ready: BTreeMap<Arc<QueueKey>, ReadyQueue>,
    /// Ready messages per priority (high, normal, low), for the gauge.
    ready_by_priority: [usize; 3],
    keys: Interner<QueueKey>,
    campaigns: Interner<str>,
    tenants: Interner<str>,
    /// (tenant, campaign) index pairs the entries refer to.
    owners: Interner<(u32, u32)>,
    /// Turn lengths of tenants in their destinations' round-robin (default 1).
    weights: HashMap<Arc<str>, u32>,
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

impl Inner {
    fn new(bucket_ms: u64) -> Inner {
        Inner {
            entries: HashMap::new(),
            near: BTreeSet::new(),
            near_until: 0,
            far: BTreeMap::new(),
            bucket_ms: bucket_ms.max(1),
            far_ids: 0,
            far_stale: 0,
            ready: BTreeMap::new(),
            ready_by_priority: [0; 3],
            keys: Interner::default(),
            campaigns: Interner::default(),
            tenants: Interner::default(),
            owners: Interner::default(),
            weights: HashMap::new(),
            counts: HashMap::new(),
            totals: DestinationCounts::default(),
            suspended_dests: HashMap::new(),
            suspended_queues: HashMap::new(),
            suspended_campaigns: HashMap::new(),
            finished_during_reload: None,
        }
    }
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
        tags: &Tags<'_>,
        due_ms: u64,
        received_ms: u64,
        now_ms: u64,
    ) {
        if !self.entries.contains_key(&id) {
            let dest = self
                .keys
                .acquire(destination, || Arc::new(destination.clone()));
            let campaign = tags
                .campaign
                .map_or(NO_CAMPAIGN, |c| self.campaigns.acquire(c, || Arc::from(c)));
            let tenant = tags
                .tenant
                .map_or(NO_TENANT, |t| self.tenants.acquire(t, || Arc::from(t)));
            let owner = self
                .owners
                .acquire(&(tenant, campaign), || Arc::new((tenant, campaign)));
            // Counted as in flight for one instant so `set_state` can do the bookkeeping.
            self.entries.insert(
                id,
                Entry::new(tags.priority, dest, owner, received_ms, State::InFlight),
            );
            if let Some(key) = self.keys.get(dest).cloned() {
                self.count(&key, State::InFlight, 1);
            }
        }
        let to = if due_ms <= now_ms {
            self.due_state(&id, now_ms)
        } else {
            State::Scheduled(due_ms)
        };
        self.set_state(id, to);
        self.publish();
    }

    /// The (tenant, campaign) indices of an entry's owner.
    fn owner(&self, owner: u32) -> (u32, u32) {
        self.owners
            .get(owner)
            .map_or((NO_TENANT, NO_CAMPAIGN), |pair| **pair)
    }

    fn key_of(&self, entry: &Entry) -> Option<Arc<QueueKey>> {
        self.keys.get(entry.dest).cloned()
    }

    fn count(&mut self, dest: &Arc<QueueKey>, state: State, delta: isize) {
        bump(&mut self.totals, state, delta);
        let c = self.counts.entry(Arc::clone(dest)).or_default();
        bump(c, state, delta);
        if c.is_empty() {
            self.counts.remove(dest);
        }
    }

    /// Adds `id` to the timer for `due`.
    fn timer_insert(&mut self, due: u64, id: MessageId) {
        let bucket = due / self.bucket_ms;
        if bucket <= self.near_until {
            self.near.insert((due, id));
        } else {
            let b = self.far.entry(bucket).or_insert_with(|| Bucket {
                ids: Vec::new(),
                earliest: u64::MAX,
            });
            b.ids.push(id);
            b.earliest = b.earliest.min(due);
            self.far_ids += 1;
        }
    }

    /// Takes `id`, scheduled for `due`, off the timer: at once from `near`; from a far bucket
    /// lazily (see the module header).
    fn timer_remove(&mut self, due: u64, id: MessageId) {
        if due / self.bucket_ms <= self.near_until {
            self.near.remove(&(due, id));
        } else {
            self.far_stale += 1;
            if self.far_stale > 4096 && self.far_stale > self.far_ids / 2 {
                self.sweep_far();
            }
        }
    }

    /// Whether `id` in far bucket `bucket` is still scheduled there; its due time if so.
    fn far_due(&self, bucket: u64, id: &MessageId) -> Option<u64> {
        match self.entries.get(id).map(Entry::state) {
            Some(State::Scheduled(due)) if due / self.bucket_ms == bucket => Some(due),
            _ => None,
        }
    }

    /// Drops the stale ids of every far bucket.
    fn sweep_far(&mut self) {
        let mut far = std::mem::take(&mut self.far);
        let mut kept = 0;
        far.retain(|bucket, b| {
            let mut earliest = u64::MAX;
            b.ids.retain(|id| match self.far_due(*bucket, id) {
                Some(due) => {
                    earliest = earliest.min(due);
                    true
                }
                None => false,
            });
            b.ids.shrink_to_fit();
            b.earliest = earliest;
            kept += b.ids.len();
            !b.ids.is_empty()
        });
        self.far = far;
        self.far_ids = kept;
        self.far_stale = 0;
    }

    /// Moves the far buckets that end before the one after `now_ms`'s into `near`.
    fn advance_timer(&mut self, now_ms: u64) {
        let horizon = now_ms / self.bucket_ms + 1;
        if horizon <= self.near_until {
            return;
        }
        self.near_until = horizon;
        while let Some(entry) = self.far.first_entry() {
            if *entry.key() > horizon {
                break;
            }
            let (bucket, b) = entry.remove_entry();
            self.far_ids -= b.ids.len();
            for id in b.ids {
                match self.far_due(bucket, &id) {
                    Some(due) => {
                        self.near.insert((due, id));
                    }
                    None => self.far_stale = self.far_stale.saturating_sub(1),
                }
            }
        }
    }

    fn next_due(&self) -> Option<u64> {
        let near = self.near.first().map(|(due, _)| *due);
        let far = self.far.first_key_value().map(|(_, b)| b.earliest);
        match (near, far) {
            (Some(n), Some(f)) => Some(n.min(f)),
            (n, f) => n.or(f),
        }
    }

    /// Moves an entry to `to`, keeping the containers and counts in step. The caller has
    /// already taken it out of the ready queue of its old state where that matters.
    fn set_state(&mut self, id: MessageId, to: State) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let from = entry.state();
        entry.set_state(to);
        let dest_index = entry.dest;
        let (priority, owner) = (entry.priority(), entry.owner);
        let (tenant, campaign) = self.owner(owner);
        let group = Group {
            tenant,
            campaign,
            priority,
        };
        let Some(dest) = self.keys.get(dest_index).cloned() else {
            return;
        };
        if let State::Scheduled(due) = from {
            self.timer_remove(due, id);
        }
        match to {
            State::Scheduled(due) => self.timer_insert(due, id),
            State::Ready => {
                self.ready
                    .entry(Arc::clone(&dest))
                    .or_default()
                    .push(group, id);
                self.ready_by_priority[group.priority as usize] += 1;
            }
            State::InFlight | State::Parked => {}
        }
        if from == State::Ready {
            let n = &mut self.ready_by_priority[group.priority as usize];
            *n = n.saturating_sub(1);
        }
        self.count(&dest, from, -1);
        self.count(&dest, to, 1);
    }

    /// Removes an entry whatever its state (finished, purged), dropping its references.
    fn remove_entry(&mut self, id: &MessageId) -> Option<(Arc<QueueKey>, State)> {
        let entry = self.entries.remove(id)?;
        if let Some(finished) = &mut self.finished_during_reload {
            finished.insert(*id);
        }
        let state = entry.state();
        let key = self.key_of(&entry);
        if let State::Scheduled(due) = state {
            self.timer_remove(due, *id);
        }
        self.keys.release(entry.dest);
        let (tenant, campaign) = self.owner(entry.owner);
        self.owners.release(entry.owner);
        if campaign != NO_CAMPAIGN {
            self.campaigns.release(campaign);
        }
        if tenant != NO_TENANT {
            self.tenants.release(tenant);
        }
        if state == State::Ready {
            let n = &mut self.ready_by_priority[entry.priority() as usize];
            *n = n.saturating_sub(1);
        }
        let key = key?;
        self.count(&key, state, -1);
        Some((key, state))
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

    fn campaign_held(&self, campaign: u32, now_ms: u64) -> bool {
        self.campaigns
            .get(campaign)
            .and_then(|c| self.suspended_campaigns.get(&**c))
            .is_some_and(|until| *until > now_ms)
    }

    /// Where a message that is due goes: its ready queue, or parked if its campaign is held.
    fn due_state(&self, id: &MessageId, now_ms: u64) -> State {
        match self.entries.get(id) {
            Some(e) if self.campaign_held(self.owner(e.owner).1, now_ms) => State::Parked,
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
        for (priority, n) in Priority::ALL.into_iter().zip(self.ready_by_priority) {
            metrics::gauge!(READY_GAUGE, "priority" => priority.as_str()).set(n as f64);
        }
    }

    /// The ids `selector` matches.
    fn matching(&self, selector: &Selector) -> Vec<MessageId> {
        match selector {
            Selector::Domain(d) => {
                // Every queue of the name, whatever its source.
                let dests: HashSet<u32> = self
                    .keys
                    .index
                    .iter()
                    .filter(|(k, _)| k.name() == d.as_str())
                    .map(|(_, i)| *i)
                    .collect();
                if dests.is_empty() {
                    return Vec::new();
                }
                self.entries
                    .iter()
                    .filter(|(_, e)| dests.contains(&e.dest))
                    .map(|(id, _)| *id)
                    .collect()
            }
            Selector::Campaign(c) => self.in_campaign(c, |_| true),
        }
    }

    /// The ids `filter` selects whose state passes `keep`: one pass over the entries, with
    /// the names looked up once.
    fn filtered(&self, filter: &Filter, keep: impl Fn(State) -> bool) -> Vec<MessageId> {
        let dests: Option<HashSet<u32>> = filter.domain.as_ref().map(|d| {
            self.keys
                .index
                .iter()
                .filter(|(k, _)| k.name() == d.as_str())
                .map(|(_, i)| *i)
                .collect()
        });
        // A name nobody uses matches nothing (`Some(None)`).
        let campaign = filter.campaign.as_deref().map(|c| self.campaigns.find(c));
        let tenant = filter.tenant.as_deref().map(|t| self.tenants.find(t));
        if matches!(campaign, Some(None)) || matches!(tenant, Some(None)) {
            return Vec::new();
        }
        self.entries
            .iter()
            .filter(|(_, e)| {
                let (t, c) = self.owner(e.owner);
                dests.as_ref().is_none_or(|d| d.contains(&e.dest))
                    && campaign.is_none_or(|want| want == Some(c))
                    && tenant.is_none_or(|want| want == Some(t))
                    && keep(e.state())
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// Removes `ids` (none of them in flight) from the schedule, in one pass over each
    /// affected ready queue.
    fn take_ids(&mut self, ids: &[MessageId]) {
        let mut ready: HashMap<Arc<QueueKey>, HashSet<MessageId>> = HashMap::new();
        for id in ids {
            if let Some((key, State::Ready)) = self.remove_entry(id) {
                ready.entry(key).or_default().insert(*id);
            }
        }
        for (dest, ids) in ready {
            self.remove_from_ready(&dest, &ids);
        }
        self.publish();
    }

    /// The ids of campaign `name` whose state passes `keep`.
    fn in_campaign(&self, name: &str, keep: impl Fn(State) -> bool) -> Vec<MessageId> {
        let Some(c) = self.campaigns.find(name) else {
            return Vec::new();
        };
        self.entries
            .iter()
            .filter(|(_, e)| self.owner(e.owner).1 == c && keep(e.state()))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// The schedule, shared by injection and delivery.
pub struct Scheduler {
    inner: Mutex<Inner>,
    notify: Notify,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler::with_timer_bucket(TIMER_BUCKET_MS)
    }
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

    /// An empty schedule whose far timer buckets span `bucket_ms` (tests use small ones to
    /// exercise the bucket moves).
    pub(crate) fn with_timer_bucket(bucket_ms: u64) -> Scheduler {
        Scheduler {
            inner: Mutex::new(Inner::new(bucket_ms)),
            notify: Notify::new(),
        }
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
        let tags = Tags {
            campaign,
            ..Tags::default()
        };
        self.schedule_with(id, destination, &tags, due_ms, received_ms, now_ms)
    }

    /// [`Scheduler::schedule`] with the message's tenant and priority (how it is served
    /// among its destination's waiting mail).
    pub fn schedule_with(
        &self,
        id: MessageId,
        destination: &QueueKey,
        tags: &Tags<'_>,
        due_ms: u64,
        received_ms: u64,
        now_ms: u64,
    ) -> bool {
        {
            let mut inner = self.lock();
            if let Some(e) = inner.entries.get(&id) {
                if e.state() != State::InFlight {
                    return false;
                }
            }
            inner.place(id, destination, tags, due_ms, received_ms, now_ms);
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
        let tags = Tags {
            campaign,
            ..Tags::default()
        };
        self.restore_with(id, destination, &tags, due_ms, received_ms, now_ms)
    }

    /// [`Scheduler::restore`] with the message's tenant and priority.
    pub fn restore_with(
        &self,
        id: MessageId,
        destination: &QueueKey,
        tags: &Tags<'_>,
        due_ms: u64,
        received_ms: u64,
        now_ms: u64,
    ) -> bool {
        {
            let mut inner = self.lock();
            if inner.knows(&id) {
                return false;
            }
            inner.place(id, destination, tags, due_ms, received_ms, now_ms);
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
        inner.advance_timer(now_ms);
        while let Some(&(due, id)) = inner.near.first() {
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

    /// When the next scheduled message comes due, if any (possibly a little earlier: a far
    /// bucket answers with its earliest time, which may belong to a message gone since).
    pub fn next_due(&self) -> Option<u64> {
        self.lock().next_due()
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
        let Inner {
            ready,
            tenants,
            weights,
            ..
        } = &mut *inner;
        let queue = ready.get_mut(destination)?;
        // A tenant's turn lasts its weight in messages (`[[tenant]] weight`, default 1).
        let weight = |tenant: u32| {
            tenants
                .get(tenant)
                .and_then(|name| weights.get(name))
                .copied()
                .unwrap_or(1)
        };
        let id = queue.pop(weight)?;
        if queue.is_empty() {
            ready.remove(destination);
        }
        // Already out of the ready queue: only the state and the counts change.
        inner.set_state(id, State::InFlight);
        inner.publish();
        Some(id)
    }

    /// Forgets a message (delivered, bounced, expired or purged), whatever its state.
    pub fn finish(&self, id: MessageId) {
        let mut inner = self.lock();
        if let Some((key, State::Ready)) = inner.remove_entry(&id) {
            inner.remove_from_ready(&key, &HashSet::from([id]));
        }
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
                    .is_some_and(|e| e.state() != State::InFlight)
            })
            .collect();
        inner.take_ids(&ids);
        ids
    }

    /// Removes up to `limit` messages `filter` selects from the schedule and returns their
    /// ids, for a transfer to another instance; in-flight messages stay, their workers finish
    /// them. The caller owns the ids until it finishes them or schedules them again.
    pub fn take_filtered(&self, filter: &Filter, limit: usize) -> Vec<MessageId> {
        let mut inner = self.lock();
        let mut ids = inner.filtered(filter, |s| s != State::InFlight);
        ids.truncate(limit);
        inner.take_ids(&ids);
        ids
    }

    /// How many messages `filter` selects, in flight included.
    pub fn count_filtered(&self, filter: &Filter) -> usize {
        let inner = self.lock();
        if filter.is_all() {
            return inner.entries.len();
        }
        inner.filtered(filter, |_| true).len()
    }

    /// Puts an in-flight message back on the timer for `due_ms` without touching its
    /// destination or campaign (e.g. its spool record could not be read just now).
    pub fn defer(&self, id: MessageId, due_ms: u64) {
        let mut inner = self.lock();
        if inner
            .entries
            .get(&id)
            .is_some_and(|e| e.state() == State::InFlight)
        {
            inner.set_state(id, State::Scheduled(due_ms));
            inner.publish();
        }
    }

    /// Gives back memory the schedule no longer needs after a wave (spare hash-table and
    /// interner capacity, stale timer ids). Destination keys and campaign names go as soon
    /// as their last message does. Returns how many interner slots were released.
    pub fn compact(&self) -> usize {
        let mut inner = self.lock();
        if inner.far_stale > 0 {
            inner.sweep_far();
        }
        let released = inner.keys.shrink() + inner.campaigns.shrink() + inner.tenants.shrink();
        inner.owners.shrink();
        inner.counts.shrink_to_fit();
        // Only when the table is mostly empty: shrinking rehashes every entry under the lock.
        if inner.entries.capacity() > 4 * inner.entries.len().max(1024) {
            inner.entries.shrink_to_fit();
        }
        released
    }

    /// Destination keys and campaign names held (for tests and the memory view).
    pub fn interned(&self) -> usize {
        let inner = self.lock();
        inner.keys.len() + inner.campaigns.len() + inner.tenants.len()
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
                        .is_some_and(|e| matches!(e.state(), State::Scheduled(_)))
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
                inner
                    .suspended_dests
                    .insert(Arc::from(d.as_str()), until_ms);
            }
            Selector::Campaign(c) => {
                inner
                    .suspended_campaigns
                    .insert(Arc::from(c.as_str()), until_ms);
                let ready = inner.in_campaign(c, |s| s == State::Ready);
                let mut by_dest: HashMap<Arc<QueueKey>, HashSet<MessageId>> = HashMap::new();
                for id in &ready {
                    if let Some(key) = inner.entries.get(id).and_then(|e| inner.key_of(e)) {
                        by_dest.entry(key).or_default().insert(*id);
                    }
                }
                for (dest, ids) in by_dest {
                    inner.remove_from_ready(&dest, &ids);
                }
                for id in ready {
                    // Out of the ready queue already; `set_state` only moves the counts.
                    inner.set_state(id, State::Parked);
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
            inner
                .suspended_queues
                .insert(Arc::new(queue.clone()), until_ms);
        } else {
            inner
                .suspended_dests
                .insert(Arc::from(queue.name()), until_ms);
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
                    unpark(&mut inner, c, now_ms);
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

    /// What [`Scheduler::destinations`] reports but `oldest_received_ms` (left `None`), which
    /// needs a pass over every queued message: this costs a step per destination, cheap
    /// enough for every metrics scrape and status page.
    pub fn destination_counts(&self, now_ms: u64) -> Vec<(QueueKey, DestinationCounts)> {
        let inner = self.lock();
        inner
            .counts
            .iter()
            .map(|(d, c)| {
                let mut c = c.clone();
                c.oldest_received_ms = None;
                c.suspended_until_ms = inner.held_until(d, now_ms);
                (QueueKey::clone(d), c)
            })
            .collect()
    }

    /// Counts per destination.
    pub fn destinations(&self, now_ms: u64) -> Vec<(QueueKey, DestinationCounts)> {
        let inner = self.lock();
        let mut oldest: HashMap<u32, u64> = HashMap::new();
        for e in inner.entries.values() {
            let o = oldest.entry(e.dest).or_insert(e.received_ms());
            *o = (*o).min(e.received_ms());
        }
        let mut out: Vec<(QueueKey, DestinationCounts)> = inner
            .counts
            .iter()
            .map(|(d, c)| {
                let mut c = c.clone();
                c.oldest_received_ms = inner.keys.find(d).and_then(|i| oldest.get(&i)).copied();
                c.suspended_until_ms = inner.held_until(d, now_ms);
                (QueueKey::clone(d), c)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Sets the tenants' turn lengths in their destinations' round-robin (a tenant not named
    /// gets 1): with weights 3 and 1, two tenants with mail waiting for one destination get
    /// three quarters and one quarter of its deliveries.
    pub fn set_tenant_weights(&self, weights: HashMap<String, u32>) {
        self.lock().weights = weights
            .into_iter()
            .map(|(name, w)| (Arc::from(name.as_str()), w.max(1)))
            .collect();
    }

    /// The ready mail of one destination by tenant, campaign and priority, largest first.
    pub fn groups(&self, destination: &QueueKey) -> Vec<GroupCounts> {
        let inner = self.lock();
        let Some(queue) = inner.ready.get(destination) else {
            return Vec::new();
        };
        let name = |interner: &Interner<str>, i: u32| interner.get(i).map(|n| n.to_string());
        let mut out: Vec<GroupCounts> = queue
            .groups()
            .into_iter()
            .map(|(g, ready)| GroupCounts {
                tenant: name(&inner.tenants, g.tenant),
                campaign: name(&inner.campaigns, g.campaign),
                priority: g.priority,
                ready,
            })
            .collect();
        out.sort_by(|a, b| b.ready.cmp(&a.ready).then(a.priority.cmp(&b.priority)));
        out
    }

    /// Ready messages per priority (high, normal, low) across every destination.
    pub fn ready_by_priority(&self) -> [usize; 3] {
        self.lock().ready_by_priority
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

fn unpark(inner: &mut Inner, campaign: &str, now_ms: u64) -> usize {
    let parked = inner.in_campaign(campaign, |s| s == State::Parked);
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
        s.schedule(a, &q("x.test"), None, 100, 1000, 50);
        s.schedule(b, &q("x.test"), None, 200, 2000, 50);
        s.schedule(c, &q("y.test"), None, 10, 3000, 50);
        assert_eq!(s.totals().scheduled, 2);
        assert_eq!(s.totals().ready, 1);
        assert_eq!(s.next_due(), Some(100));
        assert_eq!(s.promote(150), 1);
        assert_eq!(s.pop_ready(&q("x.test"), 150), Some(a));
        assert_eq!(s.pop_ready(&q("x.test"), 150), None);
        assert_eq!(s.totals().in_flight, 1);
        // Rescheduling an in-flight message moves it back to the timer.
        s.schedule(a, &q("x.test"), None, 300, 1000, 150);
        assert_eq!(s.totals().in_flight, 0);
        assert_eq!(s.totals().scheduled, 2);
        let dests = s.destinations(150);
        assert_eq!(dests.len(), 2);
        assert_eq!(dests[0].0, q("x.test"));
        assert_eq!(dests[0].1.scheduled, 2);
        // To the second: the schedule keeps reception times in seconds.
        assert_eq!(dests[0].1.oldest_received_ms, Some(1000));
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
        let mut cheap = s.destination_counts(10);
        cheap.sort_by(|a, b| a.0.cmp(&b.0));
        let full = s.destinations(10);
        assert_eq!(cheap.len(), full.len());
        for ((qa, a), (qb, b)) in cheap.iter().zip(&full) {
            assert_eq!(qa, qb);
            assert_eq!(
                (a.ready, a.scheduled, a.in_flight),
                (b.ready, b.scheduled, b.in_flight)
            );
            assert_eq!(a.suspended_until_ms, b.suspended_until_ms);
        }
        assert_eq!(cheap[0].1.suspended_until_ms, Some(u64::MAX));
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
    fn a_transfer_takes_what_its_filter_selects_and_never_an_in_flight_message() {
        let s = Scheduler::new();
        let tags = |tenant, campaign| Tags {
            tenant,
            campaign,
            ..Tags::default()
        };
        let (a, b, c, d) = (
            MessageId::generate(),
            MessageId::generate(),
            MessageId::generate(),
            MessageId::generate(),
        );
        s.schedule_with(a, &q("x.test"), &tags(Some("acme"), Some("nov")), 0, 0, 10);
        s.schedule_with(b, &q("x.test"), &tags(Some("acme"), None), 500, 0, 10);
        s.schedule_with(c, &q("y.test"), &tags(Some("acme"), Some("nov")), 0, 0, 10);
        s.schedule_with(d, &q("x.test"), &tags(Some("other"), Some("nov")), 0, 0, 10);
        let x_acme = Filter {
            domain: Some("x.test".into()),
            tenant: Some("acme".into()),
            ..Filter::default()
        };
        assert_eq!(s.count_filtered(&x_acme), 2);
        let nobody = Filter {
            campaign: Some("never-seen".into()),
            ..Filter::default()
        };
        assert_eq!(s.count_filtered(&nobody), 0);
        assert!(s.take_filtered(&nobody, 10).is_empty());
        // In flight: its worker keeps it.
        assert_eq!(s.pop_ready(&q("x.test"), 10), Some(a));
        assert_eq!(s.take_filtered(&x_acme, 10), vec![b]);
        assert_eq!(s.count_filtered(&x_acme), 1);
        assert_eq!(s.len(), 3);
        // Everything, a few at a time.
        let all = Filter::default();
        assert!(all.is_all());
        let first = s.take_filtered(&all, 1);
        assert_eq!(first.len(), 1);
        let rest = s.take_filtered(&all, 10);
        let mut taken: Vec<MessageId> = first.into_iter().chain(rest).collect();
        taken.sort();
        let mut want = vec![c, d];
        want.sort();
        assert_eq!(taken, want);
        assert_eq!(s.len(), 1);
        assert_eq!(s.totals().in_flight, 1);
        assert_eq!(s.totals().ready, 0);
        assert!(s.pop_ready(&q("y.test"), 10).is_none());
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
    fn far_messages_come_due_in_order_and_early_leavers_are_swept() {
        // Buckets of 100 ms: everything past the next bucket waits as plain id lists.
        let s = Scheduler::with_timer_bucket(100);
        let ids: Vec<MessageId> = (0..10_000).map(|_| MessageId::generate()).collect();
        for (i, id) in ids.iter().enumerate() {
            // Due 1 000 .. 100 999 ms, in no particular order.
            let due = 1_000 + (i as u64 * 7_919) % 100_000;
            s.schedule(*id, &q("x.test"), Some("c"), due, 0, 0);
        }
        assert_eq!(s.next_due(), Some(1_000));
        assert_eq!(s.promote(999), 0);
        assert_eq!(s.promote(1_000), 1);
        // Half of them leave early (the one due is among them): stale ids in the buckets.
        for id in ids.iter().step_by(2) {
            s.finish(*id);
        }
        assert_eq!(s.totals().scheduled, 5_000);
        {
            let inner = s.lock();
            assert!(
                inner.far_stale >= 4_096,
                "removals from far buckets are lazy"
            );
        }
        s.compact();
        let scheduled = s.totals().scheduled;
        {
            let inner = s.lock();
            assert_eq!(inner.far_stale, 0);
            assert_eq!(inner.far_ids + inner.near.len(), scheduled);
        }
        // Every remaining message comes due exactly once, in time order, never early.
        let mut seen = HashSet::new();
        let mut now = 1_000;
        while let Some(due) = s.next_due() {
            now = due.max(now);
            s.promote(now);
            while let Some(id) = s.pop_ready(&q("x.test"), now) {
                let i = ids.iter().position(|x| *x == id).unwrap();
                assert!(1_000 + (i as u64 * 7_919) % 100_000 <= now, "due early");
                assert!(seen.insert(id), "due twice");
                s.finish(id);
            }
            now += 1;
        }
        assert_eq!(seen.len(), 5_000);
        assert!(s.is_empty());
    }

    #[test]
    fn a_message_rescheduled_into_its_old_bucket_comes_due_once() {
        let s = Scheduler::with_timer_bucket(100);
        let a = MessageId::generate();
        s.schedule(a, &q("x.test"), Some("c"), 5_000, 0, 0);
        // Made due now (its far copy goes stale), taken, deferred into the same bucket.
        assert_eq!(s.retry_now(&Selector::Campaign("c".into()), 10), 1);
        assert_eq!(s.pop_ready(&q("x.test"), 10), Some(a));
        s.schedule(a, &q("x.test"), Some("c"), 5_010, 0, 10);
        assert_eq!(s.promote(5_009), 0);
        assert_eq!(s.promote(5_010), 1);
        assert_eq!(s.pop_ready(&q("x.test"), 5_010), Some(a));
        assert_eq!(s.promote(6_000), 0);
        assert_eq!(s.totals().in_flight, 1);
        assert_eq!(s.next_due(), None);
    }

    #[test]
    fn names_go_with_their_last_message() {
        let s = Scheduler::new();
        let ids: Vec<MessageId> = (0..100).map(|_| MessageId::generate()).collect();
        for (i, id) in ids.iter().enumerate() {
            s.schedule(*id, &q(&format!("d{i}.test")), Some("c"), 0, 0, 10);
        }
        s.suspend(&Selector::Domain("held.test".into()), u64::MAX, 10);
        assert_eq!(s.interned(), 101, "100 destinations and one campaign");
        for id in &ids[..99] {
            s.finish(*id);
        }
        assert_eq!(s.interned(), 2, "the last destination and its campaign");
        s.finish(ids[99]);
        assert_eq!(s.interned(), 0);
        assert_eq!(s.compact(), 101, "every slot is free");
        // The hold is not a message's: it stays.
        assert!(!s
            .ready_destinations(10)
            .iter()
            .any(|(d, _)| d.name() == "held.test"));
        assert_eq!(s.suspensions(10).len(), 1);
        // Freed slots are used again.
        let again = MessageId::generate();
        s.schedule(again, &q("new.test"), Some("c2"), 0, 0, 10);
        assert_eq!(s.interned(), 2);
        assert_eq!(s.pop_ready(&q("new.test"), 10), Some(again));
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
