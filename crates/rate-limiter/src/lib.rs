//! Traffic shaping: per-destination connection caps and message/connection rates.
//!
//! Rules come from `[[shaping]]`: the most specific match for a destination wins (an exact
//! domain, then the longest glob, then an `mx:` provider suffix, then `*`). Rates are enforced
//! with governor's GCRA, so a throttled destination sleeps until its next permit instead of
//! polling, and never holds up another destination.

use dashmap::DashMap;
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Errors of this crate.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// A rate string was not `N/s`, `N/m` or `N/h` with N > 0.
    #[error("invalid rate {0:?}: expected N/s, N/m or N/h with N > 0")]
    BadRate(String),
    /// A match pattern is malformed.
    #[error("invalid shaping match {0:?}")]
    BadMatch(String),
}

/// A rate such as `100/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// How many.
    pub count: NonZeroU32,
    /// Per this long.
    pub per: Duration,
}

impl FromStr for Rate {
    type Err = RateError;
    fn from_str(s: &str) -> Result<Rate, RateError> {
        let bad = || RateError::BadRate(s.to_owned());
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let count = NonZeroU32::new(count).ok_or_else(bad)?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        Ok(Rate { count, per })
    }
}

impl Rate {
    fn quota(&self) -> Quota {
        // GCRA: one permit every per/count, with a burst of the full count so a fresh
        // destination may start at full speed.
        let period = self.per / self.count.get();
        Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(self.count))
            .allow_burst(self.count)
    }
}

/// The limits that apply to one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Concurrent SMTP sessions.
    pub max_connections: usize,
    /// Messages per time unit.
    pub max_message_rate: Option<Rate>,
    /// New connections per time unit.
    pub max_connection_rate: Option<Rate>,
    /// Messages per session before it is closed and a new one opened.
    pub max_deliveries_per_connection: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 32,
            max_message_rate: None,
            max_connection_rate: None,
            max_deliveries_per_connection: 100,
        }
    }
}

/// What a shaping rule matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Matcher {
    /// One domain exactly.
    Domain(String),
    /// `*.example.test`: any subdomain (and the domain itself).
    Glob(String),
    /// `mx:*.google.com`: destinations whose MX host names end with the suffix.
    MxSuffix(String),
    /// `*`: everything.
    Any,
}

impl FromStr for Matcher {
    type Err = RateError;
    fn from_str(s: &str) -> Result<Matcher, RateError> {
        let s = s.trim().to_ascii_lowercase();
        if s == "*" {
            return Ok(Matcher::Any);
        }
        if let Some(rest) = s.strip_prefix("mx:") {
            let suffix = rest.trim_start_matches('*').trim_start_matches('.');
            if suffix.is_empty() {
                return Err(RateError::BadMatch(s));
            }
            return Ok(Matcher::MxSuffix(suffix.to_owned()));
        }
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(RateError::BadMatch(s));
            }
            return Ok(Matcher::Glob(rest.to_owned()));
        }
        if s.is_empty() || s.contains('*') || s.contains(char::is_whitespace) {
            return Err(RateError::BadMatch(s));
        }
        Ok(Matcher::Domain(s))
    }
}

fn has_suffix(name: &str, suffix: &str) -> bool {
    name == suffix
        || (name.len() > suffix.len()
            && name.ends_with(suffix)
            && name.as_bytes()[name.len() - suffix.len() - 1] == b'.')
}

impl Matcher {
    /// Whether the matcher applies to a destination, and how specific the match is (higher
    /// wins): an exact domain beats the longest glob, which beats an `mx:` suffix, then `*`.
    pub fn specificity(&self, domain: &str, mx_hosts: &[String]) -> Option<usize> {
        match self {
            Matcher::Domain(d) => (d == domain).then_some(3_000_000),
            Matcher::Glob(suffix) => has_suffix(domain, suffix).then_some(2_000_000 + suffix.len()),
            Matcher::MxSuffix(suffix) => (!mx_hosts.is_empty()
                && mx_hosts.iter().all(|h| has_suffix(h, suffix)))
            .then_some(1_000_000 + suffix.len()),
            Matcher::Any => Some(0),
        }
    }
}

/// Holds the live limiters of each destination.
pub struct DestinationLimiter {
    limits: Limits,
    connections: Arc<Semaphore>,
    messages: Option<governor::DefaultDirectRateLimiter>,
    new_connections: Option<governor::DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for DestinationLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationLimiter")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl DestinationLimiter {
    fn new(limits: Limits) -> DestinationLimiter {
        DestinationLimiter {
            connections: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            messages: limits
                .max_message_rate
                .map(|r| RateLimiter::direct(r.quota())),
            new_connections: limits
                .max_connection_rate
                .map(|r| RateLimiter::direct(r.quota())),
            limits,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A connection slot, if the destination is below `max_connections`. Dropping the permit
    /// frees the slot.
    pub fn try_connection_slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.connections).try_acquire_owned().ok()
    }

    /// Waits for a connection slot. Dropping the permit frees it.
    pub async fn connection_slot(&self) -> OwnedSemaphorePermit {
        loop {
            // The semaphore is never closed, so acquiring only fails in theory; a retry
            // keeps the signature simple for callers.
            if let Ok(permit) = Arc::clone(&self.connections).acquire_owned().await {
                return permit;
            }
        }
    }

    /// Sessions currently holding a slot.
    pub fn connections_in_use(&self) -> usize {
        self.limits.max_connections.max(1) - self.connections.available_permits()
    }

    /// Waits until a new connection may be opened.
    pub async fn until_connection_permitted(&self) {
        if let Some(l) = &self.new_connections {
            l.until_ready().await;
        }
    }

    /// Waits until another message may be sent.
    pub async fn until_message_permitted(&self) {
        if let Some(l) = &self.messages {
            l.until_ready().await;
        }
    }
}

/// A shaping rule: matcher and limits.
#[derive(Debug, Clone)]
pub struct Rule {
    /// What it matches.
    pub matcher: Matcher,
    /// What it imposes.
    pub limits: Limits,
}

/// The rule table and the limiter of every destination seen.
pub struct Shaper {
    rules: Vec<Rule>,
    default: Limits,
    live: DashMap<String, Arc<DestinationLimiter>>,
}

impl std::fmt::Debug for Shaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shaper")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

impl Shaper {
    /// A shaper with these rules; destinations no rule matches get `default`.
    pub fn new(rules: Vec<Rule>, default: Limits) -> Shaper {
        Shaper {
            rules,
            default,
            live: DashMap::new(),
        }
    }

    /// The limits the most specific rule gives a destination.
    pub fn limits_for(&self, domain: &str, mx_hosts: &[String]) -> Limits {
        let domain = domain.to_ascii_lowercase();
        self.rules
            .iter()
            .filter_map(|r| r.matcher.specificity(&domain, mx_hosts).map(|s| (s, r)))
            .max_by_key(|(s, _)| *s)
            .map(|(_, r)| r.limits.clone())
            .unwrap_or_else(|| self.default.clone())
    }

    /// The live limiter of destination `key` (created from the limits of `domain`/`mx_hosts`
    /// the first time).
    pub fn limiter(&self, key: &str, domain: &str, mx_hosts: &[String]) -> Arc<DestinationLimiter> {
        if let Some(l) = self.live.get(key) {
            return Arc::clone(&l);
        }
        let limits = self.limits_for(domain, mx_hosts);
        Arc::clone(
            &self
                .live
                .entry(key.to_owned())
                .or_insert_with(|| Arc::new(DestinationLimiter::new(limits))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let r: Rate = "100/s".parse().unwrap();
        assert_eq!(r.count.get(), 100);
        assert_eq!(r.per, Duration::from_secs(1));
        assert_eq!(
            "5/h".parse::<Rate>().unwrap().per,
            Duration::from_secs(3600)
        );
        for bad in ["0/s", "x/s", "10", "10/w", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn most_specific_rule_wins() {
        let lim = |n| Limits {
            max_connections: n,
            ..Limits::default()
        };
        let rule = |m: &str, n| Rule {
            matcher: m.parse().unwrap(),
            limits: lim(n),
        };
        let shaper = Shaper::new(
            vec![
                rule("*", 1),
                rule("mx:*.google.com", 2),
                rule("*.example.test", 3),
                rule("a.example.test", 4),
            ],
            lim(99),
        );
        let google = vec![
            "aspmx.l.google.com".to_owned(),
            "alt1.aspmx.l.google.com".to_owned(),
        ];
        assert_eq!(
            shaper.limits_for("a.example.test", &google).max_connections,
            4
        );
        assert_eq!(
            shaper.limits_for("b.example.test", &google).max_connections,
            3
        );
        assert_eq!(shaper.limits_for("example.test", &[]).max_connections, 3);
        assert_eq!(
            shaper.limits_for("customer.com", &google).max_connections,
            2
        );
        assert_eq!(
            shaper
                .limits_for("other.com", &["mx.other.com".into()])
                .max_connections,
            1
        );
        assert_eq!(
            Shaper::new(vec![], lim(7))
                .limits_for("x", &[])
                .max_connections,
            7
        );
        assert!("mx:".parse::<Matcher>().is_err());
        assert!("a*b".parse::<Matcher>().is_err());
    }

    #[test]
    fn connection_slots_are_capped() {
        let l = DestinationLimiter::new(Limits {
            max_connections: 2,
            ..Limits::default()
        });
        let a = l.try_connection_slot().unwrap();
        let _b = l.try_connection_slot().unwrap();
        assert!(l.try_connection_slot().is_none());
        assert_eq!(l.connections_in_use(), 2);
        drop(a);
        assert!(l.try_connection_slot().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn message_rate_waits_without_busy_looping() {
        let l = DestinationLimiter::new(Limits {
            max_message_rate: Some("10/s".parse().unwrap()),
            ..Limits::default()
        });
        for _ in 0..10 {
            l.until_message_permitted().await;
        }
        assert!(l.messages.as_ref().unwrap().check().is_err());
    }
}
