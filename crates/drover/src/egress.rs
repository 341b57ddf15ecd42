//! Egress sources: which local address (and EHLO name) a message leaves from.
//!
//! A message's source is chosen once and kept across retries: the last source it used if
//! that is still in its pool, otherwise a weighted pick that is stable per message id. The
//! stickiness is what lets a greylisted message come back from the address the receiver
//! saw first.

use crate::config::Config;
use queue::MessageMeta;
use queue_key::QueueKey;
use std::collections::HashMap;
use std::net::IpAddr;

/// One egress source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Its name.
    pub name: String,
    /// Address to bind; `None` lets the OS choose.
    pub address: Option<IpAddr>,
    /// EHLO name; `None` uses the engine's.
    pub ehlo_name: Option<String>,
}

#[derive(Debug, Clone)]
struct Rule {
    tenant: Option<String>,
    campaign: Option<String>,
    domain: Option<String>,
    pool: String,
}

/// The egress configuration, ready for lookups.
#[derive(Debug, Clone, Default)]
pub struct Egress {
    sources: HashMap<String, Source>,
    pools: HashMap<String, Vec<(String, u32)>>,
    rules: Vec<Rule>,
}

impl Egress {
    /// Builds the tables from a validated configuration.
    pub fn from_config(config: &Config) -> Egress {
        let sources: HashMap<String, Source> = config
            .egress_source
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Source {
                        name: s.name.clone(),
                        address: s.source_address,
                        ehlo_name: s.ehlo_name.clone(),
                    },
                )
            })
            .collect();
        let mut pools: HashMap<String, Vec<(String, u32)>> = config
            .egress_pool
            .iter()
            .map(|p| {
                let members = p
                    .sources
                    .iter()
                    .map(|m| (m.name.clone(), m.weight))
                    .collect();
                (p.name.clone(), members)
            })
            .collect();
        if !pools.contains_key("default") && !sources.is_empty() {
            let mut all: Vec<(String, u32)> = sources.keys().map(|n| (n.clone(), 1)).collect();
            all.sort();
            pools.insert("default".into(), all);
        }
        let rules = config
            .egress_rule
            .iter()
            .map(|r| Rule {
                tenant: r.tenant.clone(),
                campaign: r.campaign.clone(),
                domain: r.domain.as_ref().map(|d| d.to_ascii_lowercase()),
                pool: r.pool.clone(),
            })
            .collect();
        Egress {
            sources,
            pools,
            rules,
        }
    }

    /// A source by name.
    pub fn source(&self, name: &str) -> Option<&Source> {
        self.sources.get(name)
    }

    /// The queue a message waits in: its domain, with the source it leaves from.
    pub fn queue_for(&self, meta: &MessageMeta) -> QueueKey {
        QueueKey::with_source(meta.domain.as_str(), self.source_for(meta))
    }

    /// The source a message leaves from; `None` when no sources are configured.
    pub fn source_for(&self, meta: &MessageMeta) -> Option<&str> {
        let pool_name = self
            .rules
            .iter()
            .find(|r| {
                let eq = |want: &Option<String>, have: Option<&str>| {
                    want.as_deref().is_none_or(|w| Some(w) == have)
                };
                eq(&r.tenant, meta.tenant.as_deref())
                    && eq(&r.campaign, meta.campaign.as_deref())
                    && eq(&r.domain, Some(meta.domain.as_str()))
            })
            .map_or("default", |r| r.pool.as_str());
        let members = self.pools.get(pool_name)?;
        if let Some(last) = &meta.last_source {
            if let Some((name, _)) = members.iter().find(|(n, _)| n == last) {
                return Some(name);
            }
        }
        let total: u64 = members.iter().map(|(_, w)| u64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        // Stable per message, and evenly spread: a hash of the id (UUIDv7 bits are partly a
        // clock and a counter, so the raw bits would not spread).
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(meta.id.as_bytes(), &mut hasher);
        let mut pick = std::hash::Hasher::finish(&hasher) % total;
        for (name, weight) in members {
            if pick < u64::from(*weight) {
                return Some(name);
            }
            pick -= u64::from(*weight);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use queue::MessageId;

    fn meta(tenant: Option<&str>) -> MessageMeta {
        MessageMeta {
            id: MessageId::generate(),
            sender: String::new(),
            recipient: "a@x.test".into(),
            domain: "x.test".into(),
            campaign: None,
            tenant: tenant.map(str::to_owned),
            received_ms: 0,
            due_ms: 0,
            attempts: 0,
            headers: Default::default(),
            last_source: None,
            priority: Default::default(),
            metadata: None,
            arrived_ms: None,
            size: 0,
        }
    }

    #[test]
    fn weights_rules_and_stickiness() {
        let config = Config::parse(include_str!("../../../deploy/drover.example.toml")).unwrap();
        let egress = Egress::from_config(&config);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..3000 {
            let m = meta(None);
            let s = egress.source_for(&m).unwrap().to_owned();
            // Stable for the same message.
            assert_eq!(egress.source_for(&m), Some(s.as_str()));
            *counts.entry(s).or_default() += 1;
        }
        let (ip1, ip2) = (counts["ip1"], counts["ip2"]);
        assert!(
            ip1 > ip2 * 3 / 2 && ip1 < ip2 * 5 / 2,
            "2:1 weights, got {counts:?}"
        );
        assert_eq!(egress.source_for(&meta(Some("acme"))), Some("ip2"));
        let mut sticky = meta(None);
        sticky.last_source = Some("ip2".into());
        assert_eq!(egress.source_for(&sticky), Some("ip2"));
        sticky.last_source = Some("gone".into());
        assert!(egress.source_for(&sticky).is_some());
        assert_eq!(
            egress.source("ip1").unwrap().address,
            "127.0.0.2".parse().ok()
        );
        assert_eq!(Egress::default().source_for(&meta(None)), None);
        let acme = meta(Some("acme"));
        assert_eq!(
            egress.queue_for(&acme),
            QueueKey::with_source("x.test", Some("ip2"))
        );
        assert_eq!(Egress::default().queue_for(&acme), QueueKey::new("x.test"));
    }
}
