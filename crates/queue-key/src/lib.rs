//! The name of a delivery queue, and of the limiter and pooled sessions of a site.
//!
//! Mail is queued per recipient domain, and per egress source when the message is bound to a
//! named one: each source has its own sessions and limits (contract §2: `max_connections`
//! is per source). Connections, their caps and rates are kept per site (the MX rollup name)
//! and source. A [`QueueKey`] is that pair, `name` and optional `source`, so no component
//! has to build or split a joined string.
//!
//! Operators see keys in the admin API, `drover queue list` and logs in their [`Display`]
//! form, `name` or `name|source`; that form is for people, never parsed back. Source names
//! cannot contain `|` (the configuration refuses them), so it is unambiguous.
//!
//! [`Display`]: std::fmt::Display

use std::fmt;

/// A recipient domain (or a site) and the egress source its mail leaves from, if the message
/// is bound to a named one.
///
/// Ordered by name, then source (a key without a source first): the dispatcher walks the
/// ready queues round-robin in this order.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct QueueKey {
    name: String,
    source: Option<String>,
}

impl QueueKey {
    /// The key of `name` without an egress source.
    pub fn new(name: impl Into<String>) -> QueueKey {
        QueueKey {
            name: name.into(),
            source: None,
        }
    }

    /// The key of `name` bound to egress source `source`, when there is one.
    pub fn with_source(name: impl Into<String>, source: Option<&str>) -> QueueKey {
        QueueKey {
            name: name.into(),
            source: source.map(str::to_owned),
        }
    }

    /// The recipient domain of a delivery queue, or the site of a limiter or session pool.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The egress source, when the mail is bound to a named one.
    pub fn source(&self) -> Option<&str> {
        self.source.as_deref()
    }

    /// The key of the same source under another name: a queue's site key, which its
    /// limiter and pooled sessions are kept under, is `queue.with_name(site)`.
    pub fn with_name(&self, name: impl Into<String>) -> QueueKey {
        QueueKey {
            name: name.into(),
            source: self.source.clone(),
        }
    }
}

impl fmt::Display for QueueKey {
    /// `name`, or `name|source`: the form operators see, which must not change.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{}|{source}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeSet, HashSet};

    #[test]
    fn displays_as_operators_know_it() {
        assert_eq!(QueueKey::new("x.test").to_string(), "x.test");
        assert_eq!(
            QueueKey::with_source("x.test", Some("ip1")).to_string(),
            "x.test|ip1"
        );
        assert_eq!(QueueKey::with_source("x.test", None).to_string(), "x.test");
    }

    #[test]
    fn parts_and_site_keys() {
        let queue = QueueKey::with_source("x.test", Some("ip1"));
        assert_eq!((queue.name(), queue.source()), ("x.test", Some("ip1")));
        let site = queue.with_name("mx.example");
        assert_eq!((site.name(), site.source()), ("mx.example", Some("ip1")));
        let plain = QueueKey::new("y.test").with_name("route:y.test");
        assert_eq!((plain.name(), plain.source()), ("route:y.test", None));
        assert_eq!(
            QueueKey::new("x.test"),
            QueueKey::with_source("x.test", None)
        );
        let distinct: HashSet<QueueKey> = [
            QueueKey::new("x.test"),
            queue.clone(),
            QueueKey::with_source("x.test", Some("ip2")),
            queue,
        ]
        .into_iter()
        .collect();
        assert_eq!(distinct.len(), 3);
    }

    #[test]
    fn ordered_by_name_then_source() {
        let keys: BTreeSet<QueueKey> = [
            QueueKey::with_source("a.testb", None),
            QueueKey::with_source("a.test", Some("ip2")),
            QueueKey::with_source("b.test", None),
            QueueKey::with_source("a.test", Some("ip1")),
            QueueKey::new("a.test"),
        ]
        .into_iter()
        .collect();
        let shown: Vec<String> = keys.iter().map(ToString::to_string).collect();
        // A name's queues stay together, even where the joined strings would sort apart
        // ('|' sorts after letters: "a.test|ip1" > "a.testb").
        assert_eq!(
            shown,
            ["a.test", "a.test|ip1", "a.test|ip2", "a.testb", "b.test"]
        );
    }
}
