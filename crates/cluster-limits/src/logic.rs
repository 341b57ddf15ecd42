//! The decisions of the cluster limits, without I/O: key names, lease ids, when to renew,
//! how long to wait, and when the fallback starts and ends.

use rate_limiter::Rate;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What the cluster limits need to know (`[cluster]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `redis://host:port/db`.
    pub redis_url: String,
    /// This instance's name in lease ids (a host or pod name), so an operator looking at the
    /// lease sets sees who holds what.
    pub instance_id: String,
    /// How long a lease lives without being renewed: how long a crashed instance's sessions
    /// keep counting.
    pub lease_ttl: Duration,
    /// Prefix of every key, so several clusters can share one Redis.
    pub key_prefix: String,
    /// How long one Redis call may take before the limits fall back to the local share.
    pub timeout: Duration,
}

/// Which shared rate a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKind {
    /// Messages.
    Messages,
    /// New connections.
    Connections,
}

/// The Redis key of a destination's lease set (`<prefix>conn:<destination>`).
pub fn lease_key(prefix: &str, destination: &str) -> String {
    format!("{prefix}conn:{destination}")
}

/// The Redis key of a destination's rate (`<prefix>rate:msg:<destination>` or
/// `<prefix>rate:conn:<destination>`).
pub fn rate_key(prefix: &str, kind: RateKind, destination: &str) -> String {
    let kind = match kind {
        RateKind::Messages => "msg",
        RateKind::Connections => "conn",
    };
    format!("{prefix}rate:{kind}:{destination}")
}

/// The Redis key of a destination's "wanted" flag (`<prefix>wanted:<destination>`), set
/// while an instance waits for one of its leases.
pub fn wanted_key(prefix: &str, destination: &str) -> String {
    format!("{prefix}wanted:{destination}")
}

/// How long a waiter's "wanted" flag lasts: longer than the longest wait between its polls
/// ([`poll_delay`]), so a steady waiter keeps it up, and short enough that idle sessions are
/// kept again soon after the last waiter is served.
pub const WANTED_TTL: Duration = Duration::from_millis(1000);

/// Lease ids: `<instance>:<process nonce>:<n>`. The nonce tells a restarted instance's leases
/// from those its crashed predecessor of the same name left behind (which must still expire,
/// not be mistaken for its own and renewed).
#[derive(Debug)]
pub struct LeaseIds {
    prefix: String,
    next: AtomicU64,
}

impl LeaseIds {
    /// Ids for `instance`, with this process's `nonce`.
    pub fn new(instance: &str, nonce: u64) -> LeaseIds {
        LeaseIds {
            prefix: format!("{instance}:{nonce:016x}"),
            next: AtomicU64::new(0),
        }
    }

    /// A fresh id.
    pub fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}:{n}", self.prefix)
    }
}

/// What the heartbeat does, and how often: it renews the leases every third of their
/// lifetime (so two renewals can fail before one expires) and probes Redis at least every
/// second while it is unreachable.
pub fn heartbeat_every(lease_ttl: Duration) -> Duration {
    (lease_ttl / 3).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// How often the leases are renewed.
pub fn renew_every(lease_ttl: Duration) -> Duration {
    (lease_ttl / 3).max(Duration::from_millis(100))
}

/// How long a caller waits before asking again for a lease of a full destination: there is
/// no notification across instances, so it polls, starting at 25 ms and doubling up to
/// 400 ms, with `jitter` (0..1) spreading the instances' polls.
pub fn poll_delay(attempt: u32, jitter: f64) -> Duration {
    let base = Duration::from_millis(25) * 2u32.saturating_pow(attempt.min(4));
    base.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0) + Duration::from_millis(5)
}

/// The GCRA parameters of a rate, in µs: the emission interval and the burst tolerance
/// (none: permits are spread evenly, as the local limiters spread them).
pub fn gcra_params(rate: Rate) -> (u64, u64) {
    let interval = u64::try_from(rate.period().as_micros()).unwrap_or(u64::MAX);
    (interval.max(1), 0)
}

/// A change of the fallback state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Redis stopped answering: cluster-scoped limits fall back to the local share.
    Degraded,
    /// Redis answers again: the shared limits are back.
    Recovered,
}

/// Whether Redis is reachable, as the last call saw it; starts reachable.
#[derive(Debug, Default)]
pub struct Health {
    degraded: bool,
}

impl Health {
    /// Records the outcome of a call; returns the transition it makes, if any (so the edge
    /// logs once per transition, not once per failed call).
    pub fn observe(&mut self, ok: bool) -> Option<Transition> {
        let was = std::mem::replace(&mut self.degraded, !ok);
        match (was, ok) {
            (false, false) => Some(Transition::Degraded),
            (true, true) => Some(Transition::Recovered),
            _ => None,
        }
    }

    /// Whether the limits are in fallback.
    pub fn is_degraded(&self) -> bool {
        self.degraded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ids_are_distinct_per_destination_kind_and_process() {
        assert_eq!(
            lease_key("drover:", "mx.test|ip1"),
            "drover:conn:mx.test|ip1"
        );
        assert_eq!(
            rate_key("drover:", RateKind::Messages, "mx.test"),
            "drover:rate:msg:mx.test"
        );
        assert_ne!(
            rate_key("p:", RateKind::Messages, "a"),
            rate_key("p:", RateKind::Connections, "a")
        );
        let first = LeaseIds::new("pod-1", 7);
        let restarted = LeaseIds::new("pod-1", 8);
        let a = first.next_id();
        assert_ne!(a, first.next_id());
        assert_ne!(a, restarted.next_id(), "a restart never reuses an id");
        assert!(a.starts_with("pod-1:"));
    }

    #[test]
    fn the_fallback_is_reported_once_per_transition() {
        let mut health = Health::default();
        assert_eq!(health.observe(true), None);
        assert_eq!(health.observe(false), Some(Transition::Degraded));
        assert_eq!(health.observe(false), None);
        assert!(health.is_degraded());
        assert_eq!(health.observe(true), Some(Transition::Recovered));
        assert_eq!(health.observe(true), None);
    }

    #[test]
    fn waits_and_periods_stay_in_bounds() {
        assert_eq!(
            heartbeat_every(Duration::from_secs(30)),
            Duration::from_secs(1)
        );
        assert_eq!(
            renew_every(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
        assert_eq!(
            heartbeat_every(Duration::from_millis(90)),
            Duration::from_millis(100)
        );
        let first = poll_delay(0, 0.0);
        assert!(first >= Duration::from_millis(15) && first <= Duration::from_millis(35));
        assert!(poll_delay(100, 1.0) <= Duration::from_millis(410));
        let (interval, tolerance) = gcra_params("5/s".parse().unwrap());
        assert_eq!((interval, tolerance), (200_000, 0));
        for attempt in 0..10 {
            assert!(
                poll_delay(attempt, 1.0) < WANTED_TTL / 2,
                "a waiter keeps its flag up"
            );
        }
        assert_eq!(wanted_key("d:", "mx.test"), "d:wanted:mx.test");
    }
}
