//! Recent activity for the status page (sans-IO: the caller passes the time): counts per
//! 10-second slot over the last hour, and which domains met greylisting lately. Small and
//! fixed in size whatever the traffic: 360 slots of a few counters each, and at most
//! [`MAX_GREYLISTED`] domains.

use std::collections::{BTreeMap, HashMap, VecDeque};

/// Width of one slot of the history.
pub(crate) const SLOT_MS: u64 = 10_000;
/// Slots kept: an hour.
pub(crate) const SLOTS: usize = 360;
/// How long a domain counts as greylisted after its last greylisting reply.
pub(crate) const GREYLIST_MEMORY_MS: u64 = 15 * 60 * 1000;
/// Domains remembered as greylisted at most (the oldest make room).
pub(crate) const MAX_GREYLISTED: usize = 10_000;

/// What happened, as the page counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event<'a> {
    /// Messages accepted into the spool.
    Received(u64),
    /// A 2xx from a receiver.
    Delivered,
    /// A temporary failure, with its bounce category.
    Deferred(&'a str),
    /// A permanent failure (bounce, expiration, admin bounce, inbound DSN), by category.
    Bounced(&'a str),
    /// An inbound complaint (ARF), by feedback type.
    Complaint(&'a str),
}

/// The counts of one slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Start of the slot, in ms since the epoch (a multiple of [`SLOT_MS`]).
    pub(crate) start_ms: u64,
    /// Messages received.
    pub(crate) received: u64,
    /// Messages delivered.
    pub(crate) delivered: u64,
    /// Temporary failures.
    pub(crate) deferred: u64,
    /// Permanent failures by category.
    pub(crate) bounced: BTreeMap<String, u64>,
    /// Complaints by feedback type.
    pub(crate) complaints: BTreeMap<String, u64>,
}

/// The history.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    slots: VecDeque<Slot>,
    greylisted: HashMap<String, u64>,
}

impl Activity {
    /// Counts `event` at `now_ms`.
    pub(crate) fn record(&mut self, event: Event<'_>, now_ms: u64) {
        let slot = self.slot(now_ms);
        match event {
            Event::Received(n) => slot.received += n,
            Event::Delivered => slot.delivered += 1,
            Event::Deferred(_) => slot.deferred += 1,
            Event::Bounced(category) => *slot.bounced.entry(category.to_owned()).or_default() += 1,
            Event::Complaint(kind) => *slot.complaints.entry(kind.to_owned()).or_default() += 1,
        }
    }

    /// Notes that `domain` answered with greylisting at `now_ms`.
    pub(crate) fn greylisted(&mut self, domain: &str, now_ms: u64) {
        if self.greylisted.len() >= MAX_GREYLISTED && !self.greylisted.contains_key(domain) {
            self.greylisted
                .retain(|_, at| now_ms.saturating_sub(*at) < GREYLIST_MEMORY_MS);
            if self.greylisted.len() >= MAX_GREYLISTED {
                let oldest = self
                    .greylisted
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(d, _)| d.clone());
                if let Some(d) = oldest {
                    self.greylisted.remove(&d);
                }
            }
        }
        self.greylisted.insert(domain.to_owned(), now_ms);
    }

    /// Whether `domain` met greylisting within [`GREYLIST_MEMORY_MS`] of `now_ms`.
    pub(crate) fn is_greylisted(&self, domain: &str, now_ms: u64) -> bool {
        self.greylisted
            .get(domain)
            .is_some_and(|at| now_ms.saturating_sub(*at) < GREYLIST_MEMORY_MS)
    }

    /// The last `n` slots up to `now_ms`, oldest first, empty slots included.
    pub(crate) fn recent(&self, n: usize, now_ms: u64) -> Vec<Slot> {
        let last = now_ms / SLOT_MS * SLOT_MS;
        (0..n as u64)
            .rev()
            .map(|back| {
                let start = last.saturating_sub(back * SLOT_MS);
                self.slots
                    .iter()
                    .find(|s| s.start_ms == start)
                    .cloned()
                    .unwrap_or(Slot {
                        start_ms: start,
                        ..Slot::default()
                    })
            })
            .collect()
    }

    /// The sums over the last hour up to `now_ms`.
    pub(crate) fn last_hour(&self, now_ms: u64) -> Slot {
        let from = now_ms.saturating_sub(SLOTS as u64 * SLOT_MS);
        let mut sum = Slot::default();
        for s in self.slots.iter().filter(|s| s.start_ms > from) {
            sum.received += s.received;
            sum.delivered += s.delivered;
            sum.deferred += s.deferred;
            for (k, v) in &s.bounced {
                *sum.bounced.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &s.complaints {
                *sum.complaints.entry(k.clone()).or_default() += v;
            }
        }
        sum
    }

    /// The slot of `now_ms`, made (and old ones dropped) as needed.
    fn slot(&mut self, now_ms: u64) -> &mut Slot {
        let start = now_ms / SLOT_MS * SLOT_MS;
        let index = match self.slots.iter().rposition(|s| s.start_ms == start) {
            Some(i) => i,
            None => {
                // Slots stay in time order; a clock step back gets a slot placed in order.
                let at = self.slots.partition_point(|s| s.start_ms < start);
                self.slots.insert(
                    at,
                    Slot {
                        start_ms: start,
                        ..Slot::default()
                    },
                );
                while self.slots.len() > SLOTS {
                    self.slots.pop_front();
                }
                self.slots
                    .iter()
                    .rposition(|s| s.start_ms == start)
                    .unwrap_or(self.slots.len() - 1)
            }
        };
        &mut self.slots[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_ten_second_slot() {
        let mut a = Activity::default();
        let t = 1_000_000_000;
        a.record(Event::Received(5), t);
        a.record(Event::Delivered, t + 1);
        a.record(Event::Delivered, t + SLOT_MS);
        a.record(Event::Bounced("bad-mailbox"), t + SLOT_MS);
        let recent = a.recent(3, t + SLOT_MS);
        assert_eq!(recent.len(), 3);
        assert_eq!(recent[0].delivered, 0);
        assert_eq!((recent[1].received, recent[1].delivered), (5, 1));
        assert_eq!(recent[2].delivered, 1);
        assert_eq!(recent[2].bounced["bad-mailbox"], 1);
    }

    #[test]
    fn the_hour_sums_and_forgets_what_is_older() {
        let mut a = Activity::default();
        let t = 1_000_000_000;
        a.record(Event::Complaint("abuse"), t);
        a.record(Event::Bounced("bad-domain"), t);
        a.record(Event::Bounced("bad-domain"), t + 60_000);
        let hour = a.last_hour(t + 60_000);
        assert_eq!(hour.bounced["bad-domain"], 2);
        assert_eq!(hour.complaints["abuse"], 1);
        let later = a.last_hour(t + 3_600_000 + 30_000);
        assert_eq!(later.bounced["bad-domain"], 1);
        assert!(later.complaints.is_empty());
        // Past an hour of slots the oldest are dropped.
        for i in 0..(SLOTS as u64 + 10) {
            a.record(Event::Delivered, t + 2 * 3_600_000 + i * SLOT_MS);
        }
        assert_eq!(a.slots.len(), SLOTS);
    }

    #[test]
    fn greylisting_is_remembered_for_a_while_within_a_bound() {
        let mut a = Activity::default();
        a.greylisted("grey.example", 0);
        assert!(a.is_greylisted("grey.example", GREYLIST_MEMORY_MS - 1));
        assert!(!a.is_greylisted("grey.example", GREYLIST_MEMORY_MS));
        assert!(!a.is_greylisted("other.example", 0));
        for i in 0..(MAX_GREYLISTED as u64 + 5) {
            a.greylisted(&format!("d{i}.example"), 1 + i);
        }
        assert!(a.greylisted.len() <= MAX_GREYLISTED);
    }
}
