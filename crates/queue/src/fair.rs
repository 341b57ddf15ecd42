//! One destination's ready messages, served fairly (issue 17): by priority first, with aging
//! so lower priorities are never starved, then round-robin across tenants (a tenant's turn
//! lasts its weight in messages), and within a tenant across its campaigns, one message each.
//! A tenant with ten messages waiting gets its share of the destination while another's
//! million wait their turn too. Pure data structure: the scheduler drives it under its lock.

use crate::MessageId;
use std::collections::{HashMap, VecDeque};

/// How urgent a message is (contract §3 `priority`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Served before normal and low mail of the same destination.
    High,
    /// The default.
    #[default]
    Normal,
    /// Served after the others, but never starved.
    Low,
}

impl Priority {
    /// Every priority, most urgent first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The name used in the API, headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// Parses `high`, `normal` or `low` (any case).
    pub fn parse(text: &str) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(text.trim()))
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// After this many messages served from a higher priority while a lower one waits, the
/// lower one gets the next turn: high mail overtakes, low mail still drains (about one in
/// nine deliveries while everything above it is busy).
pub(crate) const AGING: u32 = 8;

/// Who a ready message belongs to: interned tenant and campaign indices and its priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Group {
    pub(crate) tenant: u32,
    pub(crate) campaign: u32,
    pub(crate) priority: Priority,
}

/// One tenant's waiting mail in one priority: a queue per campaign, served in turn.
#[derive(Default)]
struct Tenant {
    campaigns: HashMap<u32, VecDeque<MessageId>>,
    order: VecDeque<u32>,
    len: usize,
}

impl Tenant {
    fn push(&mut self, campaign: u32, id: MessageId) {
        let q = self.campaigns.entry(campaign).or_default();
        if q.is_empty() {
            self.order.push_back(campaign);
        }
        q.push_back(id);
        self.len += 1;
    }

    fn pop(&mut self) -> Option<MessageId> {
        let campaign = self.order.pop_front()?;
        let q = self.campaigns.get_mut(&campaign)?;
        let id = q.pop_front();
        if q.is_empty() {
            self.campaigns.remove(&campaign);
        } else {
            self.order.push_back(campaign);
        }
        self.len -= usize::from(id.is_some());
        id
    }

    fn retain(&mut self, keep: &mut impl FnMut(&MessageId) -> bool) {
        for q in self.campaigns.values_mut() {
            q.retain(|id| keep(id));
        }
        self.campaigns.retain(|_, q| !q.is_empty());
        let campaigns = &self.campaigns;
        self.order.retain(|c| campaigns.contains_key(c));
        self.len = self.campaigns.values().map(VecDeque::len).sum();
    }
}

/// One priority's waiting mail: tenants in round-robin order.
#[derive(Default)]
struct Class {
    tenants: HashMap<u32, Tenant>,
    order: VecDeque<u32>,
    /// Messages the front tenant may still take in its turn.
    credit: u32,
    len: usize,
    /// Turns given to higher priorities while this one waited (see [`AGING`]).
    waited: u32,
}

impl Class {
    fn push(&mut self, group: Group, id: MessageId) {
        let t = self.tenants.entry(group.tenant).or_default();
        if t.len == 0 {
            self.order.push_back(group.tenant);
        }
        t.push(group.campaign, id);
        self.len += 1;
    }

    fn pop(&mut self, weight: &impl Fn(u32) -> u32) -> Option<MessageId> {
        let tenant = *self.order.front()?;
        if self.credit == 0 {
            self.credit = weight(tenant).max(1);
        }
        let t = self.tenants.get_mut(&tenant)?;
        let id = t.pop();
        self.credit -= 1;
        if t.len == 0 {
            self.tenants.remove(&tenant);
            self.order.pop_front();
            self.credit = 0;
        } else if self.credit == 0 {
            self.order.rotate_left(1);
        }
        self.len -= usize::from(id.is_some());
        id
    }

    fn retain(&mut self, keep: &mut impl FnMut(&MessageId) -> bool) {
        for t in self.tenants.values_mut() {
            t.retain(keep);
        }
        self.tenants.retain(|_, t| t.len > 0);
        let tenants = &self.tenants;
        let front = self.order.front().copied();
        self.order.retain(|t| tenants.contains_key(t));
        if self.order.front().copied() != front {
            self.credit = 0;
        }
        self.len = self.tenants.values().map(|t| t.len).sum();
    }
}

/// A destination's ready messages. Nearly every destination's waiting mail belongs to one
/// tenant, campaign and priority at a time: that case is a plain queue, as cheap as before
/// fair queuing; the round-robin structure is built only when a second group shows up (at a
/// million queued over 100 000 destinations, the structure everywhere cost 1 KB a
/// destination).
pub(crate) struct ReadyQueue {
    inner: Kind,
}

enum Kind {
    /// Every message of one group (any group while empty).
    One(Group, VecDeque<MessageId>),
    /// Several groups.
    Many(Box<Many>),
}

impl Default for ReadyQueue {
    fn default() -> Self {
        ReadyQueue {
            inner: Kind::One(
                Group {
                    tenant: u32::MAX,
                    campaign: u32::MAX,
                    priority: Priority::Normal,
                },
                VecDeque::new(),
            ),
        }
    }
}

#[derive(Default)]
struct Many {
    classes: [Class; 3],
    len: usize,
}

impl Many {
    fn push(&mut self, group: Group, id: MessageId) {
        self.classes[group.priority.index()].push(group, id);
        self.len += 1;
    }

    fn pop(&mut self, weight: impl Fn(u32) -> u32) -> Option<MessageId> {
        let waiting = |i: usize| self.classes[i].len > 0;
        let first = (0..3).find(|&i| waiting(i))?;
        // The lowest class that has waited its turns goes first; else the most urgent.
        let chosen = (first + 1..3)
            .rev()
            .find(|&i| waiting(i) && self.classes[i].waited >= AGING)
            .unwrap_or(first);
        for i in chosen + 1..3 {
            if self.classes[i].len > 0 {
                self.classes[i].waited += 1;
            }
        }
        self.classes[chosen].waited = 0;
        let id = self.classes[chosen].pop(&weight);
        self.len -= usize::from(id.is_some());
        id
    }
}

impl ReadyQueue {
    pub(crate) fn push(&mut self, group: Group, id: MessageId) {
        match &mut self.inner {
            Kind::One(g, q) if q.is_empty() || *g == group => {
                *g = group;
                q.push_back(id);
            }
            Kind::One(g, q) => {
                let mut many = Box::<Many>::default();
                for old in q.drain(..) {
                    many.push(*g, old);
                }
                many.push(group, id);
                self.inner = Kind::Many(many);
            }
            Kind::Many(many) => many.push(group, id),
        }
    }

    /// The next message to send: the most urgent priority, unless a lower one has waited
    /// [`AGING`] turns; within it, the tenant whose turn it is (`weight(tenant)` messages a
    /// turn).
    pub(crate) fn pop(&mut self, weight: impl Fn(u32) -> u32) -> Option<MessageId> {
        match &mut self.inner {
            Kind::One(_, q) => q.pop_front(),
            Kind::Many(many) => many.pop(weight),
        }
    }

    /// Keeps only the messages `keep` accepts (one pass over the queue).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&MessageId) -> bool) {
        match &mut self.inner {
            Kind::One(_, q) => q.retain(|id| keep(id)),
            Kind::Many(many) => {
                for c in &mut many.classes {
                    c.retain(&mut keep);
                }
                many.len = many.classes.iter().map(|c| c.len).sum();
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.inner {
            Kind::One(_, q) => q.len(),
            Kind::Many(many) => many.len,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waiting messages per (priority, tenant, campaign).
    pub(crate) fn groups(&self) -> Vec<(Group, usize)> {
        let many = match &self.inner {
            Kind::One(_, q) if q.is_empty() => return Vec::new(),
            Kind::One(g, q) => return vec![(*g, q.len())],
            Kind::Many(many) => many,
        };
        let mut out = Vec::new();
        for (priority, class) in Priority::ALL.into_iter().zip(&many.classes) {
            for (&tenant, t) in &class.tenants {
                for (&campaign, q) in &t.campaigns {
                    out.push((
                        Group {
                            tenant,
                            campaign,
                            priority,
                        },
                        q.len(),
                    ));
                }
            }
        }
        out
    }

    /// Waiting messages per priority.
    #[cfg(test)]
    pub(crate) fn by_priority(&self) -> [usize; 3] {
        let mut out = [0; 3];
        for (g, n) in self.groups() {
            out[g.priority.index()] += n;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(tenant: u32, campaign: u32, priority: Priority) -> Group {
        Group {
            tenant,
            campaign,
            priority,
        }
    }

    /// Fills `q` and returns, for each id, who it belongs to.
    fn fill(q: &mut ReadyQueue, groups: &[(Group, usize)]) -> HashMap<MessageId, Group> {
        let mut owner = HashMap::new();
        for &(group, n) in groups {
            for _ in 0..n {
                let id = MessageId::generate();
                q.push(group, id);
                owner.insert(id, group);
            }
        }
        owner
    }

    #[test]
    fn a_small_tenant_is_not_stuck_behind_a_big_one() {
        let mut q = ReadyQueue::default();
        let owner = fill(
            &mut q,
            &[
                (g(1, 0, Priority::Normal), 8_000),
                (g(2, 0, Priority::Normal), 2_000),
            ],
        );
        let first: Vec<u32> = (0..100)
            .map(|_| owner[&q.pop(|_| 1).unwrap()].tenant)
            .collect();
        let b = first.iter().filter(|t| **t == 2).count();
        assert_eq!(b, 50, "equal shares while both wait");
        // Weights 3:1.
        let mut q = ReadyQueue::default();
        let owner = fill(
            &mut q,
            &[
                (g(1, 0, Priority::Normal), 800),
                (g(2, 0, Priority::Normal), 800),
            ],
        );
        let weight = |t: u32| if t == 1 { 3 } else { 1 };
        let first: Vec<u32> = (0..400)
            .map(|_| owner[&q.pop(weight).unwrap()].tenant)
            .collect();
        assert_eq!(first.iter().filter(|t| **t == 1).count(), 300);
    }

    #[test]
    fn campaigns_of_a_tenant_share_its_turns_not_more() {
        let mut q = ReadyQueue::default();
        let owner = fill(
            &mut q,
            &[
                (g(1, 10, Priority::Normal), 100),
                (g(1, 11, Priority::Normal), 100),
                (g(2, 20, Priority::Normal), 100),
            ],
        );
        let first: Vec<Group> = (0..60).map(|_| owner[&q.pop(|_| 1).unwrap()]).collect();
        assert_eq!(first.iter().filter(|g| g.tenant == 2).count(), 30);
        assert_eq!(first.iter().filter(|g| g.campaign == 10).count(), 15);
    }

    #[test]
    fn high_goes_first_and_low_still_drains() {
        let mut q = ReadyQueue::default();
        let owner = fill(
            &mut q,
            &[
                (g(1, 0, Priority::Normal), 1_000),
                (g(1, 0, Priority::Low), 1_000),
                (g(2, 0, Priority::High), 1),
            ],
        );
        assert_eq!(owner[&q.pop(|_| 1).unwrap()].priority, Priority::High);
        let next: Vec<Priority> = (0..90)
            .map(|_| owner[&q.pop(|_| 1).unwrap()].priority)
            .collect();
        let low = next.iter().filter(|p| **p == Priority::Low).count();
        assert!(
            (9..=11).contains(&low),
            "low gets about one turn in nine: {low}"
        );
        while let Some(id) = q.pop(|_| 1) {
            assert!(owner.contains_key(&id));
        }
        assert!(q.is_empty());
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn retain_removes_wherever_the_ids_are() {
        let mut q = ReadyQueue::default();
        let owner = fill(
            &mut q,
            &[
                (g(1, 0, Priority::Normal), 10),
                (g(2, 5, Priority::High), 10),
            ],
        );
        q.retain(|id| owner[id].tenant != 2);
        assert_eq!(q.len(), 10);
        assert_eq!(q.by_priority(), [0, 10, 0]);
        assert_eq!(q.groups(), vec![(g(1, 0, Priority::Normal), 10)]);
        let mut popped = 0;
        while q.pop(|_| 1).is_some() {
            popped += 1;
        }
        assert_eq!(popped, 10);
    }

    #[test]
    fn one_group_stays_a_plain_queue_until_a_second_arrives() {
        let mut q = ReadyQueue::default();
        let owner = fill(&mut q, &[(g(1, 0, Priority::Normal), 3)]);
        assert!(matches!(q.inner, Kind::One(..)));
        assert_eq!(q.groups(), vec![(g(1, 0, Priority::Normal), 3)]);
        // A second group: the waiting ones keep their place in their group.
        let high = MessageId::generate();
        q.push(g(2, 0, Priority::High), high);
        assert!(matches!(q.inner, Kind::Many(_)));
        assert_eq!(q.len(), 4);
        assert_eq!(q.pop(|_| 1), Some(high));
        let mut rest = 0;
        while let Some(id) = q.pop(|_| 1) {
            assert!(owner.contains_key(&id));
            rest += 1;
        }
        assert_eq!(rest, 3);
        // Emptied, a plain queue takes any group again.
        let mut q = ReadyQueue::default();
        fill(&mut q, &[(g(5, 5, Priority::Low), 1)]);
        q.pop(|_| 1);
        fill(&mut q, &[(g(6, 6, Priority::High), 2)]);
        assert!(matches!(q.inner, Kind::One(..)));
        assert_eq!(q.groups(), vec![(g(6, 6, Priority::High), 2)]);
    }

    #[test]
    fn priorities_parse_and_name() {
        assert_eq!(Priority::parse(" HIGH "), Some(Priority::High));
        assert_eq!(Priority::parse("urgent"), None);
        assert_eq!(Priority::default().as_str(), "normal");
    }
}
