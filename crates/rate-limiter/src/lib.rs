//! Traffic shaping: per-destination connection caps and message/connection rates.
//!
//! Rules come from `[[shaping]]`: the most specific match for a destination wins (an exact
//! domain, then the longest glob, then an `mx:` provider suffix, then `*`). Rates are enforced
//! with governor's GCRA, so a throttled destination sleeps until its next permit instead of
//! polling, and never holds up another destination.

use dashmap::DashMap;
use governor::clock::{Clock, Reference};
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// governor's clock on tokio's time: waits are tokio sleeps, and tests with paused time
/// drive the limits deterministically.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

/// A [`TokioClock`] reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TokioInstant(tokio::time::Instant);

impl std::ops::Add<Nanos> for TokioInstant {
    type Output = TokioInstant;
    fn add(self, rhs: Nanos) -> TokioInstant {
        TokioInstant(self.0 + Duration::from(rhs))
    }
}

impl Reference for TokioInstant {
    fn duration_since(&self, earlier: Self) -> Nanos {
        Nanos::from(self.0.saturating_duration_since(earlier.0))
    }

    fn saturating_sub(&self, duration: Nanos) -> Self {
        TokioInstant(
            self.0
                .checked_sub(Duration::from(duration))
                .unwrap_or(self.0),
        )
    }
}

impl Clock for TokioClock {
    type Instant = TokioInstant;
    fn now(&self) -> TokioInstant {
        TokioInstant(tokio::time::Instant::now())
    }
}

type Gcra = RateLimiter<
    NotKeyed,
    InMemoryState,
    TokioClock,
    governor::middleware::NoOpMiddleware<TokioInstant>,
>;

fn gcra(rate: &Rate) -> Gcra {
    RateLimiter::direct_with_clock(rate.quota(), TokioClock)
}

/// Sleeps until the limiter grants a permit.
async fn wait(limiter: &Gcra) {
    while let Err(not_until) = limiter.check() {
        tokio::time::sleep(not_until.wait_time_from(TokioClock.now())).await;
    }
}

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
        // GCRA with a burst of one: permits are spread evenly (one every per/count), as
        // receivers that count per second or per minute expect, not bunched at the start.
        let period = self.per / self.count.get();
        Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(self.count))
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
    /// Concurrent sessions while backing off (default: a quarter of `max_connections`).
    pub backoff_max_connections: Option<usize>,
    /// Message rate while backing off (default: the normal rate).
    pub backoff_max_message_rate: Option<Rate>,
    /// Connection rate while backing off (default: the normal rate).
    pub backoff_max_connection_rate: Option<Rate>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 32,
            max_message_rate: None,
            max_connection_rate: None,
            max_deliveries_per_connection: 100,
            backoff_max_connections: None,
            backoff_max_message_rate: None,
            backoff_max_connection_rate: None,
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
    messages: Option<Gcra>,
    new_connections: Option<Gcra>,
    backoff_messages: Option<Gcra>,
    backoff_new_connections: Option<Gcra>,
    base: tokio::time::Instant,
    /// Backoff lasts until this many ms after `base` (0: not backing off).
    backoff_until_ms: AtomicU64,
}

impl std::fmt::Debug for DestinationLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationLimiter")
            .field("limits", &self.limits)
            .field("backing_off", &self.is_backing_off())
            .finish_non_exhaustive()
    }
}

impl DestinationLimiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: Limits) -> DestinationLimiter {
        DestinationLimiter {
            connections: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            messages: limits.max_message_rate.as_ref().map(gcra),
            new_connections: limits.max_connection_rate.as_ref().map(gcra),
            backoff_messages: limits.backoff_max_message_rate.as_ref().map(gcra),
            backoff_new_connections: limits.backoff_max_connection_rate.as_ref().map(gcra),
            base: tokio::time::Instant::now(),
            backoff_until_ms: AtomicU64::new(0),
            limits,
        }
    }

    /// The limits in force (the normal ones; see [`DestinationLimiter::is_backing_off`]).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    fn elapsed_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Switches to the backoff limits for `duration` from now; a later call extends it.
    pub fn back_off(&self, duration: Duration) {
        let until = self.elapsed_ms() + duration.as_millis() as u64;
        self.backoff_until_ms
            .fetch_max(until.max(1), Ordering::SeqCst);
    }

    /// Ends a backoff now (operator action).
    pub fn end_backoff(&self) {
        self.backoff_until_ms.store(0, Ordering::SeqCst);
    }

    /// Whether the backoff limits are in force.
    pub fn is_backing_off(&self) -> bool {
        self.elapsed_ms() < self.backoff_until_ms.load(Ordering::SeqCst)
    }

    /// The connection cap in force now.
    pub fn max_connections_now(&self) -> usize {
        let normal = self.limits.max_connections.max(1);
        if self.is_backing_off() {
            self.limits
                .backoff_max_connections
                .unwrap_or(normal / 4)
                .clamp(1, normal)
        } else {
            normal
        }
    }

    /// Whether more sessions are open than the cap in force allows (after a backoff began):
    /// a worker seeing this closes its session instead of reusing it.
    pub fn over_connection_cap(&self) -> bool {
        self.connections_in_use() > self.max_connections_now()
    }

    /// A connection slot, if the destination is below its cap. Dropping the permit frees it.
    pub fn try_connection_slot(&self) -> Option<OwnedSemaphorePermit> {
        let permit = Arc::clone(&self.connections).try_acquire_owned().ok()?;
        (self.connections_in_use() <= self.max_connections_now()).then_some(permit)
    }

    /// Waits for a connection slot under the cap in force. Dropping the permit frees it.
    pub async fn connection_slot(&self) -> OwnedSemaphorePermit {
        loop {
            // The semaphore is never closed, so acquiring cannot fail in practice.
            if let Ok(permit) = Arc::clone(&self.connections).acquire_owned().await {
                if self.connections_in_use() <= self.max_connections_now() {
                    return permit;
                }
                // Backing off below the semaphore's size: wait for sessions to close.
                drop(permit);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Sessions currently holding a slot.
    pub fn connections_in_use(&self) -> usize {
        self.limits.max_connections.max(1) - self.connections.available_permits()
    }

    /// Waits until a new connection may be opened.
    pub async fn until_connection_permitted(&self) {
        let limiter = match (&self.backoff_new_connections, self.is_backing_off()) {
            (Some(b), true) => Some(b),
            _ => self.new_connections.as_ref(),
        };
        if let Some(l) = limiter {
            wait(l).await;
        }
    }

    /// Waits until another message may be sent.
    pub async fn until_message_permitted(&self) {
        let limiter = match (&self.backoff_messages, self.is_backing_off()) {
            (Some(b), true) => Some(b),
            _ => self.messages.as_ref(),
        };
        if let Some(l) = limiter {
            wait(l).await;
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
    rules: std::sync::RwLock<Arc<Vec<Rule>>>,
    default: Limits,
    /// Live limiters with the domain and MX hosts they were made for (to re-derive them
    /// when the rules are reloaded).
    live: DashMap<String, (Arc<DestinationLimiter>, String, Vec<String>)>,
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
            rules: std::sync::RwLock::new(Arc::new(rules)),
            default,
            live: DashMap::new(),
        }
    }

    fn rules(&self) -> Arc<Vec<Rule>> {
        Arc::clone(&self.rules.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the rules (config reload). Destinations whose limits change get a fresh
    /// limiter for their next sessions; sessions already open keep their slots until they
    /// close, so nothing is dropped, and a lowered cap takes hold as they finish.
    pub fn reload(&self, rules: Vec<Rule>) {
        *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
        self.live.retain(|_, (limiter, domain, mx_hosts)| {
            *limiter.limits() == self.limits_for(domain, mx_hosts)
        });
    }

    /// The limits the most specific rule gives a destination.
    pub fn limits_for(&self, domain: &str, mx_hosts: &[String]) -> Limits {
        let domain = domain.to_ascii_lowercase();
        self.rules()
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
            return Arc::clone(&l.0);
        }
        let limits = self.limits_for(domain, mx_hosts);
        let entry = self.live.entry(key.to_owned()).or_insert_with(|| {
            (
                Arc::new(DestinationLimiter::new(limits)),
                domain.to_owned(),
                mx_hosts.to_vec(),
            )
        });
        Arc::clone(&entry.0)
    }

    /// Ends the backoff of destination `name` (a site, or every `site|source` of it); returns
    /// whether one was in force.
    pub fn end_backoff(&self, name: &str) -> bool {
        let mut ended = false;
        for entry in self.live.iter() {
            let key = entry.key();
            let matches = key == name
                || key
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('|'));
            if matches && entry.value().0.is_backing_off() {
                entry.value().0.end_backoff();
                ended = true;
            }
        }
        ended
    }

    /// Destinations currently backing off, for the admin view and metrics.
    pub fn backing_off(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .live
            .iter()
            .filter(|e| e.value().0.is_backing_off())
            .map(|e| e.key().clone())
            .collect();
        out.sort();
        out
    }
}

/// Message rates per tenant or campaign (`[[rate_limit]]`), on top of the destinations'.
#[derive(Debug, Default)]
pub struct KeyedRates {
    rates: std::collections::HashMap<String, Rate>,
    live: DashMap<String, Arc<DestinationLimiter>>,
}

impl KeyedRates {
    /// Rates by key (e.g. `tenant:acme`, `campaign:nov`).
    pub fn new(rates: std::collections::HashMap<String, Rate>) -> KeyedRates {
        KeyedRates {
            rates,
            live: DashMap::new(),
        }
    }

    /// Takes a permit for `key` if one is free now; otherwise says how long until the next
    /// one (nothing is taken then). Keys without a rate are always permitted.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let Some(rate) = self.rates.get(key) else {
            return Ok(());
        };
        let limiter = Arc::clone(&self.live.entry(key.to_owned()).or_insert_with(|| {
            Arc::new(DestinationLimiter::new(Limits {
                max_message_rate: Some(*rate),
                ..Limits::default()
            }))
        }));
        match &limiter.messages {
            Some(gcra) => gcra
                .check()
                .map_err(|not_until| not_until.wait_time_from(TokioClock.now())),
            None => Ok(()),
        }
    }

    /// Waits until `key` may send another message; keys without a rate never wait.
    pub async fn until_permitted(&self, key: &str) {
        let Some(rate) = self.rates.get(key) else {
            return;
        };
        let limiter = Arc::clone(&self.live.entry(key.to_owned()).or_insert_with(|| {
            Arc::new(DestinationLimiter::new(Limits {
                max_message_rate: Some(*rate),
                ..Limits::default()
            }))
        }));
        limiter.until_message_permitted().await;
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

    #[test]
    fn reload_replaces_only_changed_limiters() {
        let rule = |m: &str, n| Rule {
            matcher: m.parse().unwrap(),
            limits: Limits {
                max_connections: n,
                ..Limits::default()
            },
        };
        let shaper = Shaper::new(
            vec![rule("a.test", 2), rule("b.test", 3)],
            Limits::default(),
        );
        let a = shaper.limiter("a.test", "a.test", &[]);
        let b = shaper.limiter("b.test", "b.test", &[]);
        shaper.reload(vec![rule("a.test", 5), rule("b.test", 3)]);
        let a2 = shaper.limiter("a.test", "a.test", &[]);
        let b2 = shaper.limiter("b.test", "b.test", &[]);
        assert_eq!(a2.limits().max_connections, 5);
        assert!(!Arc::ptr_eq(&a, &a2));
        assert!(
            Arc::ptr_eq(&b, &b2),
            "unchanged limits keep their live state"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keyed_rates_apply_only_to_their_keys() {
        let rates = KeyedRates::new([("tenant:acme".to_owned(), "10/s".parse().unwrap())].into());
        let start = tokio::time::Instant::now();
        for _ in 0..21 {
            rates.until_permitted("tenant:acme").await;
            rates.until_permitted("tenant:other").await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((1.9..=2.2).contains(&took), "took {took}");
    }

    #[tokio::test(start_paused = true)]
    async fn twenty_per_second_over_two_hundred_messages_takes_ten_seconds() {
        let l = DestinationLimiter::new(Limits {
            max_message_rate: Some("20/s".parse().unwrap()),
            ..Limits::default()
        });
        let start = tokio::time::Instant::now();
        for _ in 0..200 {
            l.until_message_permitted().await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((9.0..=11.0).contains(&took), "took {took} s");
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_lowers_the_limits_and_ends_by_itself() {
        let l = DestinationLimiter::new(Limits {
            max_connections: 8,
            max_message_rate: Some("100/s".parse().unwrap()),
            backoff_max_connections: Some(2),
            backoff_max_message_rate: Some("10/s".parse().unwrap()),
            ..Limits::default()
        });
        let _a = l.try_connection_slot().unwrap();
        let _b = l.try_connection_slot().unwrap();
        let c = l.try_connection_slot().unwrap();
        l.back_off(Duration::from_secs(60));
        assert!(l.is_backing_off());
        assert_eq!(l.max_connections_now(), 2);
        assert!(l.over_connection_cap());
        drop(c);
        assert!(!l.over_connection_cap());
        assert!(
            l.try_connection_slot().is_none(),
            "capped at 2 while backing off"
        );
        let start = tokio::time::Instant::now();
        for _ in 0..11 {
            l.until_message_permitted().await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "10/s while backing off"
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!l.is_backing_off());
        assert_eq!(l.max_connections_now(), 8);
        let start = tokio::time::Instant::now();
        for _ in 0..11 {
            l.until_message_permitted().await;
        }
        assert!(
            start.elapsed() <= Duration::from_millis(150),
            "back to 100/s"
        );
    }
}
