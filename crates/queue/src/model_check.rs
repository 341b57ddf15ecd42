//! Model checks: random action sequences against simple in-memory models.
//!
//! The spool check drives inserts, reschedules, removals and reopen-after-close (what a
//! restart sees) and compares the spool with a map after every step that matters; the schedule
//! check drives every scheduler operation and checks its bookkeeping invariants.

use crate::spool::schedule_key_for_tests;
use crate::{MessageId, MessageMeta, Scheduler, Selector, Spool, SpoolOptions};
use proptest::prelude::*;
use queue_key::QueueKey;
use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone)]
enum SpoolAction {
    Insert(u8),
    Reschedule(usize, u64),
    Remove(usize),
    RemoveLazily(usize),
    Reopen,
}

fn spool_action() -> impl Strategy<Value = SpoolAction> {
    prop_oneof![
        3 => (1u8..5).prop_map(SpoolAction::Insert),
        2 => (any::<usize>(), 0u64..1000).prop_map(|(i, d)| SpoolAction::Reschedule(i, d)),
        2 => any::<usize>().prop_map(SpoolAction::Remove),
        1 => any::<usize>().prop_map(SpoolAction::RemoveLazily),
        1 => Just(SpoolAction::Reopen),
    ]
}

fn meta(due_ms: u64) -> MessageMeta {
    MessageMeta {
        id: MessageId::generate(),
        sender: "s@example.com".into(),
        recipient: "r@example.test".into(),
        domain: "example.test".into(),
        campaign: None,
        tenant: None,
        received_ms: 0,
        due_ms,
        attempts: 0,
        headers: Default::default(),
        last_source: None,
        priority: Default::default(),
        metadata: None,
        arrived_ms: None,
        size: 4,
    }
}

fn check_spool(spool: &Spool, model: &BTreeMap<MessageId, MessageMeta>) {
    let stored: BTreeMap<MessageId, MessageMeta> = spool
        .scan()
        .map(|m| m.map(|m| (m.id, m)))
        .collect::<Result<_, _>>()
        .expect("every record decodes");
    assert_eq!(&stored, model, "no message lost, none resurrected");
    let keys: HashSet<Vec<u8>> = spool.schedule_keys().into_iter().collect();
    let want: HashSet<Vec<u8>> = model
        .values()
        .map(|m| schedule_key_for_tests(m.due_ms, &m.id))
        .collect();
    assert_eq!(
        keys, want,
        "exactly one schedule key per message, at its due time"
    );
    for id in model.keys() {
        assert_eq!(
            spool.body(id).expect("readable").as_deref(),
            Some(&b"body"[..])
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn spool_matches_its_model(actions in proptest::collection::vec(spool_action(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        runtime.block_on(async {
            let mut spool = Spool::open(dir.path(), SpoolOptions::default()).expect("open");
            let mut model: BTreeMap<MessageId, MessageMeta> = BTreeMap::new();
            for action in actions {
                let ids: Vec<MessageId> = model.keys().copied().collect();
                let pick = |i: usize| (!ids.is_empty()).then(|| ids[i % ids.len()]);
                match action {
                    SpoolAction::Insert(n) => {
                        let batch: Vec<MessageMeta> = (0..n).map(|i| meta(u64::from(i) * 7)).collect();
                        spool
                            .insert(batch.iter().map(|m| (m.clone(), b"body".to_vec())).collect())
                            .await
                            .expect("insert");
                        model.extend(batch.into_iter().map(|m| (m.id, m)));
                    }
                    SpoolAction::Reschedule(i, due) => {
                        if let Some(id) = pick(i) {
                            let mut m = model[&id].clone();
                            let previous = m.due_ms;
                            m.due_ms = due;
                            m.attempts += 1;
                            spool.update(m.clone(), previous).await.expect("update");
                            model.insert(id, m);
                        }
                    }
                    SpoolAction::Remove(i) | SpoolAction::RemoveLazily(i) => {
                        if let Some(id) = pick(i) {
                            let due = model[&id].due_ms;
                            if matches!(action, SpoolAction::Remove(_)) {
                                spool.remove(id, due).await.expect("remove");
                            } else {
                                spool.remove_lazily(id, due).await.expect("remove");
                            }
                            model.remove(&id);
                        }
                    }
                    SpoolAction::Reopen => {
                        spool.close().expect("close");
                        drop(spool);
                        spool = Spool::open(dir.path(), SpoolOptions::default()).expect("reopen");
                        check_spool(&spool, &model);
                    }
                }
            }
            check_spool(&spool, &model);
        });
    }
}

#[derive(Debug, Clone)]
enum SchedAction {
    Schedule { dest: u8, campaign: u8, due: u64 },
    Promote(u64),
    Pop(u8),
    FinishInFlight(usize),
    RescheduleInFlight(usize, u64),
    Suspend(bool, u8, u64),
    SuspendQueue(u8, u64),
    Resume(bool, u8),
    Take(bool, u8),
    RetryNow(bool, u8),
}

fn sched_action() -> impl Strategy<Value = SchedAction> {
    prop_oneof![
        4 => (0u8..6, 0u8..3, 0u64..200).prop_map(|(dest, campaign, due)| SchedAction::Schedule { dest, campaign, due }),
        2 => (0u64..300).prop_map(SchedAction::Promote),
        3 => (0u8..6).prop_map(SchedAction::Pop),
        2 => any::<usize>().prop_map(SchedAction::FinishInFlight),
        2 => (any::<usize>(), 0u64..300).prop_map(|(i, d)| SchedAction::RescheduleInFlight(i, d)),
        1 => (any::<bool>(), 0u8..3, 0u64..400).prop_map(|(c, n, u)| SchedAction::Suspend(c, n, u)),
        1 => (0u8..6, 0u64..400).prop_map(|(d, u)| SchedAction::SuspendQueue(d, u)),
        1 => (any::<bool>(), 0u8..3).prop_map(|(c, n)| SchedAction::Resume(c, n)),
        1 => (any::<bool>(), 0u8..3).prop_map(|(c, n)| SchedAction::Take(c, n)),
        1 => (any::<bool>(), 0u8..3).prop_map(|(c, n)| SchedAction::RetryNow(c, n)),
    ]
}

/// Queue `dest` of the model: three domains, each with and without an egress source.
fn key(dest: u8) -> QueueKey {
    let source = (dest >= 3).then_some("ip1");
    QueueKey::with_source(format!("d{}.test", dest % 3), source)
}

fn selector(campaign: bool, n: u8) -> Selector {
    if campaign {
        Selector::Campaign(format!("c{n}"))
    } else {
        Selector::Domain(format!("d{n}.test"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn scheduler_bookkeeping_holds(actions in proptest::collection::vec(sched_action(), 1..80)) {
        // Timer buckets of 16 ms, so messages pass through far buckets and come up.
        let s = Scheduler::with_timer_bucket(16);
        let mut now = 100u64;
        // What the model knows: every live id and its destination; which are in flight.
        let mut live: HashMap<MessageId, QueueKey> = HashMap::new();
        let mut in_flight: Vec<MessageId> = Vec::new();
        for action in actions {
            now += 1;
            match action {
                SchedAction::Schedule { dest, campaign, due } => {
                    let id = MessageId::generate();
                    let d = key(dest);
                    s.schedule(id, &d, Some(&format!("c{campaign}")), due, now, now);
                    live.insert(id, d);
                }
                SchedAction::Promote(t) => {
                    now = now.max(t);
                    s.promote(now);
                    // Nothing due is left on the timer.
                    prop_assert!(s.next_due().is_none_or(|due| due > now));
                }
                SchedAction::Pop(dest) => {
                    if let Some(id) = s.pop_ready(&key(dest), now) {
                        prop_assert!(live.contains_key(&id));
                        prop_assert!(!in_flight.contains(&id), "popped twice");
                        in_flight.push(id);
                    }
                }
                SchedAction::FinishInFlight(i) => {
                    if !in_flight.is_empty() {
                        let id = in_flight.remove(i % in_flight.len());
                        s.finish(id);
                        live.remove(&id);
                    }
                }
                SchedAction::RescheduleInFlight(i, due) => {
                    if !in_flight.is_empty() {
                        let id = in_flight.remove(i % in_flight.len());
                        s.schedule(id, &live[&id], None, due, now, now);
                    }
                }
                SchedAction::Suspend(c, n, until) => s.suspend(&selector(c, n), now + until, now),
                SchedAction::SuspendQueue(d, until) => s.suspend_queue(&key(d), now + until),
                SchedAction::Resume(c, n) => { s.resume(&selector(c, n), now); }
                SchedAction::Take(c, n) => {
                    for id in s.take(&selector(c, n)) {
                        prop_assert!(!in_flight.contains(&id), "in-flight messages are not taken");
                        prop_assert!(live.remove(&id).is_some());
                    }
                }
                SchedAction::RetryNow(c, n) => { s.retry_now(&selector(c, n), now); }
            }
            // Invariants.
            let totals = s.totals();
            prop_assert_eq!(s.len(), live.len());
            prop_assert_eq!(totals.ready + totals.scheduled + totals.in_flight + totals.parked, live.len());
            prop_assert_eq!(totals.in_flight, in_flight.len());
            prop_assert!(totals.scheduled == 0 || s.next_due().is_some(), "a scheduled message off the timer");
            let per_dest = s.destinations(now);
            let sum = |f: fn(&crate::DestinationCounts) -> usize| per_dest.iter().map(|(_, c)| f(c)).sum::<usize>();
            prop_assert_eq!(sum(|c| c.ready), totals.ready);
            prop_assert_eq!(sum(|c| c.scheduled), totals.scheduled);
            prop_assert_eq!(sum(|c| c.parked), totals.parked);
            let ready_listed: usize = s.ready_destinations(u64::MAX).iter().map(|(_, n)| n).sum();
            prop_assert!(ready_listed <= totals.ready);
        }
        // Draining everything leaves nothing behind.
        s.resume(&Selector::Campaign("c0".into()), now);
        s.resume(&Selector::Campaign("c1".into()), now);
        s.resume(&Selector::Campaign("c2".into()), now);
        for n in 0..3 { s.resume(&Selector::Domain(format!("d{n}.test")), now); }
        for id in in_flight.drain(..) { s.finish(id); live.remove(&id); }
        s.promote(u64::MAX - 1);
        for n in 0..6 {
            while let Some(id) = s.pop_ready(&key(n), u64::MAX - 1) {
                s.finish(id);
                live.remove(&id);
            }
        }
        prop_assert!(live.is_empty(), "every message reachable: {} left", live.len());
        prop_assert!(s.is_empty());
        prop_assert_eq!(s.totals(), crate::DestinationCounts::default());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// One destination, random tenants, priorities and weights, everything ready at once:
    /// every message comes out once; while high mail waits, lower mail gets at most its aged
    /// turns (never two in a row beyond the two lower classes); among equally urgent mail,
    /// tenants get turns in proportion to their weights while they all have mail waiting.
    #[test]
    fn ready_queues_are_fair_and_prioritised(
        messages in proptest::collection::vec((0u8..4, 0u8..3), 1..400),
        weights in proptest::collection::vec(1u32..4, 4),
    ) {
        let s = Scheduler::new();
        s.set_tenant_weights(
            (0..4).map(|t| (format!("t{t}"), weights[t])).collect(),
        );
        let d = key(0);
        let tenants: Vec<String> = (0..4).map(|t| format!("t{t}")).collect();
        let mut owner: HashMap<MessageId, (usize, crate::Priority)> = HashMap::new();
        for &(tenant, priority) in &messages {
            let id = MessageId::generate();
            let priority = crate::Priority::ALL[usize::from(priority)];
            let tags = crate::Tags { campaign: None, tenant: Some(&tenants[usize::from(tenant)]), priority };
            s.schedule_with(id, &d, &tags, 0, 0, 10);
            owner.insert(id, (usize::from(tenant), priority));
        }
        // What is still waiting, per priority and tenant.
        let mut waiting = [[0usize; 4]; 3];
        for (t, p) in owner.values() {
            waiting[*p as usize][*t] += 1;
        }
        let mut seen = HashSet::new();
        let mut lower_run = 0;
        // Turns per tenant within the current class, reset when the class's set of waiting
        // tenants changes.
        let mut turns = [[0u32; 4]; 3];
        while let Some(id) = s.pop_ready(&d, 10) {
            prop_assert!(seen.insert(id), "popped twice");
            let (t, p) = owner[&id];
            let class = p as usize;
            let high_waiting = waiting[0].iter().sum::<usize>() > 0;
            if high_waiting && class != 0 {
                lower_run += 1;
                prop_assert!(lower_run <= 2, "lower mail ran ahead of waiting high mail");
            } else {
                lower_run = 0;
            }
            let all_waiting = waiting[class].iter().all(|n| *n > 0);
            if all_waiting {
                turns[class][t] += 1;
                for a in 0..4 {
                    for b in 0..4 {
                        let lead = f64::from(turns[class][a]) / f64::from(weights[a])
                            - f64::from(turns[class][b]) / f64::from(weights[b]);
                        prop_assert!(lead <= 1.0 + 1e-9, "tenant {a} ran ahead of {b}: {:?}", turns[class]);
                    }
                }
            } else {
                turns[class] = [0; 4];
            }
            waiting[class][t] -= 1;
            s.finish(id);
        }
        prop_assert_eq!(seen.len(), messages.len());
        prop_assert!(s.is_empty());
    }
}
