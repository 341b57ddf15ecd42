//! Traffic shaping: per-destination connection caps and message/connection rates.
//!
//! Rules come from `[[shaping]]`: the most specific match for a domain wins (an exact
//! domain, then the longest glob, then an `mx:` provider suffix, then `*`). Limits are kept
//! per site (the MX rollup several recipient domains share): a site gets the tightest of the
//! limits of the domains seen going to it, so the order in which they arrive does not matter.
//! Rates are enforced with governor's GCRA, so a throttled destination sleeps until its next
//! permit instead of polling, and never holds up another destination.
//!
//! A rule may be scoped to the cluster ([`Scope::Cluster`]): its caps and rates are then the
//! totals for every instance, enforced by a shared backend outside this crate (connection
//! leases and GCRA rates in Redis, the `cluster-limits` crate). This crate stays free of I/O: it
//! only knows whether that backend is reachable ([`ClusterMode`]) and, while it is not, holds a
//! cluster-scoped destination to this instance's share of its limits.
//!
//! Limiters live as long as they are used: a reload changes them in place (sessions already
//! open keep counting against the cap, unchanged rates keep their state), and
//! [`Shaper::evict_idle`] drops the ones nothing has used for a while.

use dashmap::DashMap;
use governor::clock::{Clock, Reference};
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use queue_key::QueueKey;
use std::cmp::Ordering as CmpOrdering;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a limiter nobody uses is kept before [`Shaper::evict_idle`] or
/// [`KeyedRates::evict_idle`] may drop it, when the caller has no reason to pick another.
/// Short: a limiter past it holds nothing a fresh one would not (rates keep theirs until
/// they have forgotten every permit, backoffs until they end, and one with a session open is
/// never idle), while a deferral wave over 100 000 sites would otherwise keep 100 000
/// limiters (about 660 bytes each) for as long.
pub const IDLE_EVICTION: Duration = Duration::from_secs(15);

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

fn gcra(rate: &Rate) -> Arc<Gcra> {
    Arc::new(RateLimiter::direct_with_clock(rate.quota(), TokioClock))
}

/// Takes a permit if one is free now, else says how long until the next one.
fn check(limiter: &Gcra) -> Result<(), Duration> {
    limiter
        .check()
        .map_err(|not_until| not_until.wait_time_from(TokioClock.now()))
}

/// The governor limiter of `new`: the one in use when the rate is unchanged, so its state
/// (the permits already spent) survives, else a fresh one.
fn keep_or_fresh(
    old: Option<&Arc<Gcra>>,
    old_rate: Option<Rate>,
    new: Option<Rate>,
) -> Option<Arc<Gcra>> {
    match (old, new) {
        (Some(live), Some(_)) if old_rate == new => Some(Arc::clone(live)),
        (_, rate) => rate.as_ref().map(gcra),
    }
}

/// Milliseconds from `base` to `now` (0 when `now` is earlier).
fn ms_since(base: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(base).as_millis()).unwrap_or(u64::MAX)
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
    /// How long one permit takes to come back.
    pub fn period(&self) -> Duration {
        self.per / self.count.get()
    }

    /// Orders rates from the slowest (fewest messages over time) to the fastest; equal paces
    /// (`60/m`, `1/s`) are ordered by count, so that picking the slowest of several never
    /// depends on the order they come in.
    fn pace_cmp(&self, other: &Rate) -> CmpOrdering {
        let mine = u128::from(self.count.get()) * other.per.as_nanos();
        let theirs = u128::from(other.count.get()) * self.per.as_nanos();
        mine.cmp(&theirs).then(self.count.cmp(&other.count))
    }

    fn quota(&self) -> Quota {
        // GCRA with a burst of one: permits are spread evenly (one every per/count), as
        // receivers that count per second or per minute expect, not bunched at the start.
        Quota::with_period(self.period().max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(self.count))
    }
}

/// Where a destination's limits are counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Scope {
    /// By this instance alone: the default, and the fast path (no shared backend involved).
    #[default]
    Local,
    /// Across every instance sharing the cluster backend: `max_connections` and the rates are
    /// cluster totals. While the backend is unreachable, this instance keeps to its share
    /// ([`ClusterMode`]).
    Cluster,
}

/// Whether the cluster backend is reachable, and the share of a cluster-scoped limit this
/// instance may use alone while it is not. Shared by the [`Shaper`] (which applies the share)
/// and whatever talks to the backend (which flips the state).
#[derive(Debug)]
pub struct ClusterMode {
    local_share: f64,
    degraded: std::sync::atomic::AtomicBool,
    /// Signalled when the state flips: a connection cap may have changed.
    changed: Notify,
}

impl ClusterMode {
    /// A reachable backend; `local_share` (clamped into (0, 1]) is the fraction of a cluster
    /// limit one instance may use while the backend is unreachable.
    pub fn new(local_share: f64) -> ClusterMode {
        let local_share = if local_share.is_finite() && local_share > 0.0 {
            local_share.min(1.0)
        } else {
            1.0
        };
        ClusterMode {
            local_share,
            degraded: std::sync::atomic::AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// The fraction of a cluster limit this instance uses alone while degraded.
    pub fn local_share(&self) -> f64 {
        self.local_share
    }

    /// Whether the backend is unreachable, so cluster-scoped limits fall back to the local
    /// share.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::SeqCst)
    }

    /// Records whether the backend is reachable; returns whether that changed.
    pub fn set_degraded(&self, degraded: bool) -> bool {
        let changed = self.degraded.swap(degraded, Ordering::SeqCst) != degraded;
        if changed {
            self.changed.notify_waiters();
        }
        changed
    }

    /// This instance's share of a cluster cap: `ceil(cap * local_share)`, at least 1 and at
    /// most `cap`.
    pub fn share_of(&self, cap: usize) -> usize {
        let cap = cap.max(1);
        // Caps are small integers: the product is exact in an f64.
        ((cap as f64 * self.local_share).ceil() as usize).clamp(1, cap)
    }

    /// This instance's share of a cluster rate: the same count over a period stretched by
    /// `1 / local_share`.
    pub fn share_of_rate(&self, rate: Rate) -> Rate {
        Rate {
            count: rate.count,
            per: rate.per.div_f64(self.local_share),
        }
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
    /// Whether the caps and rates are this instance's or the cluster's totals.
    pub scope: Scope,
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
            scope: Scope::Local,
        }
    }
}

/// The slower of two rates; `None` is no limit, so it loses to any rate.
fn slowest(a: Option<Rate>, b: Option<Rate>) -> Option<Rate> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.pace_cmp(&b) == CmpOrdering::Greater {
            b
        } else {
            a
        }),
        (a, b) => a.or(b),
    }
}

impl Limits {
    /// The connection cap while backing off.
    fn backoff_connections(&self) -> usize {
        let normal = self.max_connections.max(1);
        self.backoff_max_connections
            .unwrap_or(normal / 4)
            .clamp(1, normal)
    }

    /// The limits that satisfy both `self` and `other`, field by field: the lower caps,
    /// the slower rates, the fewer deliveries per connection, and the tighter backoff limits
    /// (compared as they take effect: an unset backoff cap is a quarter of the normal one, an
    /// unset backoff rate is the normal rate). Cluster scope wins over local: a site one of
    /// whose domains is limited cluster-wide is counted cluster-wide. Commutative and
    /// associative, so the limits of a site do not depend on the order its domains were seen
    /// in.
    pub fn tightest(&self, other: &Limits) -> Limits {
        let backoff_rate = |mine: Option<Rate>, my_normal, theirs: Option<Rate>, their_normal| {
            if mine.is_none() && theirs.is_none() {
                None
            } else {
                slowest(mine.or(my_normal), theirs.or(their_normal))
            }
        };
        Limits {
            max_connections: self.max_connections.min(other.max_connections),
            max_message_rate: slowest(self.max_message_rate, other.max_message_rate),
            max_connection_rate: slowest(self.max_connection_rate, other.max_connection_rate),
            max_deliveries_per_connection: self
                .max_deliveries_per_connection
                .min(other.max_deliveries_per_connection),
            backoff_max_connections: if self.backoff_max_connections.is_none()
                && other.backoff_max_connections.is_none()
            {
                None
            } else {
                Some(self.backoff_connections().min(other.backoff_connections()))
            },
            backoff_max_message_rate: backoff_rate(
                self.backoff_max_message_rate,
                self.max_message_rate,
                other.backoff_max_message_rate,
                other.max_message_rate,
            ),
            backoff_max_connection_rate: backoff_rate(
                self.backoff_max_connection_rate,
                self.max_connection_rate,
                other.backoff_max_connection_rate,
                other.max_connection_rate,
            ),
            scope: if self.scope == Scope::Cluster || other.scope == Scope::Cluster {
                Scope::Cluster
            } else {
                Scope::Local
            },
        }
    }

    /// The longest time one permit of any of the rates takes to come back: a limiter idle
    /// for longer has no rate state worth keeping.
    fn longest_period(&self) -> Duration {
        [
            self.max_message_rate,
            self.max_connection_rate,
            self.backoff_max_message_rate,
            self.backoff_max_connection_rate,
        ]
        .iter()
        .flatten()
        .map(Rate::period)
        .max()
        .unwrap_or(Duration::ZERO)
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

/// The connection count of a destination, shared with the slots it handed out.
#[derive(Debug)]
struct Connections {
    in_use: AtomicUsize,
    /// Signalled when a slot is freed or the cap may have risen.
    changed: Notify,
    /// Origin of the millisecond readings below and of the backoff deadline.
    base: Instant,
    last_used_ms: AtomicU64,
}

impl Connections {
    fn touch(&self) {
        self.last_used_ms
            .fetch_max(ms_since(self.base, Instant::now()), Ordering::Relaxed);
    }
}

/// A connection slot of a destination, held for as long as its SMTP session lives; dropping
/// it frees the slot.
///
/// Slots are counted, not pre-allocated, so a cap can be lowered below the slots already
/// held (a reload, a backoff): the holders keep theirs, and no new one is handed out until
/// enough of them have closed.
#[derive(Debug)]
pub struct ConnectionSlot {
    connections: Arc<Connections>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.connections.in_use.fetch_sub(1, Ordering::SeqCst);
        self.connections.touch();
        self.connections.changed.notify_waiters();
    }
}

/// The limits of a destination with the GCRA limiters enforcing its rates. A limiter is
/// shared (`Arc`) so that a waiter can sleep on it without holding the lock, and so that a
/// limits change keeps the ones whose rate stayed the same.
struct Enforced {
    limits: Limits,
    messages: Option<Arc<Gcra>>,
    new_connections: Option<Arc<Gcra>>,
    backoff_messages: Option<Arc<Gcra>>,
    backoff_new_connections: Option<Arc<Gcra>>,
}

impl Enforced {
    /// `cluster`: the instance's cluster mode; the local limiters of a cluster-scoped
    /// destination enforce only this instance's share of its rates (what applies while the
    /// cluster backend is unreachable; while it is reachable, the backend enforces the totals).
    fn new(limits: Limits, old: Option<&Enforced>, cluster: Option<&ClusterMode>) -> Enforced {
        let local = |l: &Limits, rate: Option<Rate>| match cluster {
            Some(mode) if l.scope == Scope::Cluster => rate.map(|r| mode.share_of_rate(r)),
            _ => rate,
        };
        let keep = |gcra: fn(&Enforced) -> Option<&Arc<Gcra>>,
                    rate: fn(&Limits) -> Option<Rate>| {
            keep_or_fresh(
                old.and_then(gcra),
                old.and_then(|o| local(&o.limits, rate(&o.limits))),
                local(&limits, rate(&limits)),
            )
        };
        Enforced {
            messages: keep(|e| e.messages.as_ref(), |l| l.max_message_rate),
            new_connections: keep(|e| e.new_connections.as_ref(), |l| l.max_connection_rate),
            backoff_messages: keep(
                |e| e.backoff_messages.as_ref(),
                |l| l.backoff_max_message_rate,
            ),
            backoff_new_connections: keep(
                |e| e.backoff_new_connections.as_ref(),
                |l| l.backoff_max_connection_rate,
            ),
            limits,
        }
    }
}

/// The live limits of one destination: its connection cap, rates and backoff.
pub struct DestinationLimiter {
    enforced: RwLock<Enforced>,
    /// The instance's cluster mode, when a cluster backend is configured.
    cluster: Option<Arc<ClusterMode>>,
    connections: Arc<Connections>,
    /// Backoff lasts until this many ms after `connections.base` (0: not backing off).
    backoff_until_ms: AtomicU64,
}

impl std::fmt::Debug for DestinationLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationLimiter")
            .field("limits", &self.limits())
            .field("in_use", &self.connections_in_use())
            .field("backing_off", &self.is_backing_off())
            .finish_non_exhaustive()
    }
}

/// Which of a destination's rates a wait is for.
#[derive(Clone, Copy)]
enum Kind {
    Messages,
    NewConnections,
}

impl DestinationLimiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: Limits) -> DestinationLimiter {
        DestinationLimiter::with_cluster(limits, None)
    }

    /// A limiter enforcing `limits`, with the instance's cluster mode (see
    /// [`Scope::Cluster`]).
    pub fn with_cluster(limits: Limits, cluster: Option<Arc<ClusterMode>>) -> DestinationLimiter {
        DestinationLimiter {
            enforced: RwLock::new(Enforced::new(limits, None, cluster.as_deref())),
            cluster,
            connections: Arc::new(Connections {
                in_use: AtomicUsize::new(0),
                changed: Notify::new(),
                base: Instant::now(),
                last_used_ms: AtomicU64::new(0),
            }),
            backoff_until_ms: AtomicU64::new(0),
        }
    }

    fn enforced(&self) -> std::sync::RwLockReadGuard<'_, Enforced> {
        self.enforced.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The limits in force (the normal ones; see [`DestinationLimiter::is_backing_off`]).
    pub fn limits(&self) -> Limits {
        self.enforced().limits.clone()
    }

    /// Puts new limits in force without disturbing what is under way: slots already held
    /// stay held (a lower cap takes hold as they are freed), and a rate that did not change
    /// keeps its limiter and so the permits already spent.
    fn update(&self, limits: Limits) {
        {
            let mut enforced = self.enforced.write().unwrap_or_else(|p| p.into_inner());
            if enforced.limits == limits {
                return;
            }
            let next = Enforced::new(limits, Some(&enforced), self.cluster.as_deref());
            *enforced = next;
        }
        // The cap may have risen: waiters look again.
        self.connections.changed.notify_waiters();
    }

    fn elapsed_ms(&self) -> u64 {
        ms_since(self.connections.base, Instant::now())
    }

    /// Switches to the backoff limits for `duration` from now; a later call extends it.
    pub fn back_off(&self, duration: Duration) {
        let span = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let until = self.elapsed_ms().saturating_add(span);
        self.backoff_until_ms
            .fetch_max(until.max(1), Ordering::SeqCst);
    }

    /// Ends a backoff now (operator action).
    pub fn end_backoff(&self) {
        self.backoff_until_ms.store(0, Ordering::SeqCst);
        self.connections.changed.notify_waiters();
    }

    /// Whether the backoff limits are in force.
    pub fn is_backing_off(&self) -> bool {
        self.backoff_left().is_some()
    }

    /// How long the backoff in force still lasts.
    fn backoff_left(&self) -> Option<Duration> {
        let until = self.backoff_until_ms.load(Ordering::SeqCst);
        let now = self.elapsed_ms();
        (now < until).then(|| Duration::from_millis(until - now))
    }

    /// The cluster mode, when this destination's limits are cluster-wide.
    fn cluster_mode(&self) -> Option<&ClusterMode> {
        self.cluster
            .as_deref()
            .filter(|_| self.enforced().limits.scope == Scope::Cluster)
    }

    /// Whether this destination's limits are cluster totals, kept by the cluster backend:
    /// its sessions need a lease and its rates a permit from the backend, and the local
    /// limits ([`DestinationLimiter::connection_slot`],
    /// [`DestinationLimiter::until_message_permitted`]) enforce only this instance's share
    /// when the backend is unreachable.
    pub fn is_cluster_scoped(&self) -> bool {
        self.cluster_mode().is_some()
    }

    /// The connection cap in force now: the cluster total for a cluster-scoped destination,
    /// or this instance's share of it while the cluster backend is unreachable.
    pub fn max_connections_now(&self) -> usize {
        let cap = {
            let enforced = self.enforced();
            if self.is_backing_off() {
                enforced.limits.backoff_connections()
            } else {
                enforced.limits.max_connections.max(1)
            }
        };
        match self.cluster_mode() {
            Some(mode) if mode.is_degraded() => mode.share_of(cap),
            _ => cap,
        }
    }

    /// Whether more sessions are open than the cap in force allows (after a backoff began or
    /// a reload lowered the cap): a worker seeing this closes its session instead of reusing
    /// it.
    pub fn over_connection_cap(&self) -> bool {
        self.connections_in_use() > self.max_connections_now()
    }

    /// A connection slot, if the destination is below its cap. Dropping the slot frees it.
    pub fn try_connection_slot(&self) -> Option<ConnectionSlot> {
        let cap = self.max_connections_now();
        let in_use = &self.connections.in_use;
        let mut current = in_use.load(Ordering::SeqCst);
        loop {
            if current >= cap {
                return None;
            }
            match in_use.compare_exchange(current, current + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        self.connections.touch();
        Some(ConnectionSlot {
            connections: Arc::clone(&self.connections),
        })
    }

    /// Waits for a connection slot under the cap in force. Dropping the slot frees it.
    pub async fn connection_slot(&self) -> ConnectionSlot {
        loop {
            // Registered before looking, so a slot freed in between is not missed.
            let changed = self.connections.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            // The cap of a cluster-scoped destination moves when the backend comes and goes.
            let never = Notify::new();
            let mode_changed = self
                .cluster_mode()
                .map_or(&never, |mode| &mode.changed)
                .notified();
            let mut mode_changed = std::pin::pin!(mode_changed);
            mode_changed.as_mut().enable();
            if let Some(slot) = self.try_connection_slot() {
                return slot;
            }
            // The backoff cap rises by itself when the backoff ends.
            let left = self.backoff_left();
            let backoff_ends = async {
                match left {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changed => {}
                _ = mode_changed => {}
                _ = backoff_ends => {}
            }
        }
    }

    /// Sessions currently holding a slot.
    pub fn connections_in_use(&self) -> usize {
        self.connections.in_use.load(Ordering::SeqCst)
    }

    /// The GCRA limiter in force for `kind` (the backoff one while backing off, if set).
    fn rate_limiter(&self, kind: Kind) -> Option<Arc<Gcra>> {
        let enforced = self.enforced();
        let (normal, backoff) = match kind {
            Kind::Messages => (&enforced.messages, &enforced.backoff_messages),
            Kind::NewConnections => (&enforced.new_connections, &enforced.backoff_new_connections),
        };
        match backoff {
            Some(b) if self.is_backing_off() => Some(Arc::clone(b)),
            _ => normal.clone(),
        }
    }

    /// The rate in force for `kind` as the rules give it (the backoff one while backing
    /// off): for a cluster-scoped destination, the cluster total.
    fn rate_now(&self, kind: Kind) -> Option<Rate> {
        let limits = &self.enforced().limits;
        let (normal, backoff) = match kind {
            Kind::Messages => (limits.max_message_rate, limits.backoff_max_message_rate),
            Kind::NewConnections => (
                limits.max_connection_rate,
                limits.backoff_max_connection_rate,
            ),
        };
        match backoff {
            Some(b) if self.is_backing_off() => Some(b),
            _ => normal,
        }
    }

    /// The message rate in force (the cluster total for a cluster-scoped destination).
    pub fn message_rate_now(&self) -> Option<Rate> {
        self.rate_now(Kind::Messages)
    }

    /// The new-connection rate in force (the cluster total for a cluster-scoped destination).
    pub fn connection_rate_now(&self) -> Option<Rate> {
        self.rate_now(Kind::NewConnections)
    }

    /// Marks the destination as used now (a wait on a shared rate, which this limiter does
    /// not see, counts as use).
    pub fn touch(&self) {
        self.connections.touch();
    }

    async fn until_permitted(&self, kind: Kind) {
        loop {
            self.connections.touch();
            // Looked up again after each sleep: a reload or backoff may have changed it.
            let Some(limiter) = self.rate_limiter(kind) else {
                return;
            };
            match check(&limiter) {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Waits until a new connection may be opened (for a cluster-scoped destination, within
    /// this instance's share of the rate).
    pub async fn until_connection_permitted(&self) {
        self.until_permitted(Kind::NewConnections).await;
    }

    /// Waits until another message may be sent (for a cluster-scoped destination, within
    /// this instance's share of the rate).
    pub async fn until_message_permitted(&self) {
        self.until_permitted(Kind::Messages).await;
    }

    /// Whether nothing depends on this limiter's state any more at `now`: no slot held, no
    /// backoff in force, and unused for `idle` (or longer, if a rate's permit takes longer
    /// than that to come back).
    fn is_idle(&self, now: Instant, idle: Duration) -> bool {
        let c = &self.connections;
        let since = ms_since(c.base, now);
        let unused =
            Duration::from_millis(since.saturating_sub(c.last_used_ms.load(Ordering::Relaxed)));
        c.in_use.load(Ordering::SeqCst) == 0
            && since >= self.backoff_until_ms.load(Ordering::SeqCst)
            && unused >= idle.max(self.enforced().limits.longest_period())
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

/// The limits the most specific of `rules` gives `domain` (lowercase) with these MX hosts.
fn limits_under(rules: &[Rule], default: &Limits, domain: &str, mx_hosts: &[String]) -> Limits {
    rules
        .iter()
        .filter_map(|r| r.matcher.specificity(domain, mx_hosts).map(|s| (s, r)))
        .max_by_key(|(s, _)| *s)
        .map(|(_, r)| r.limits.clone())
        .unwrap_or_else(|| default.clone())
}

/// The tightest of the limits `rules` give each of `domains` on a site with these MX hosts;
/// with no domain, the limits of the site alone (what `mx:` and `*` rules give it).
fn site_limits_under<'a>(
    rules: &[Rule],
    default: &Limits,
    mx_hosts: &[String],
    domains: impl IntoIterator<Item = &'a str>,
) -> Limits {
    domains
        .into_iter()
        .map(|d| limits_under(rules, default, d, mx_hosts))
        .reduce(|a, b| a.tightest(&b))
        .unwrap_or_else(|| limits_under(rules, default, "", mx_hosts))
}

/// Whether two MX host lists name the same hosts, in whatever order.
fn same_hosts(a: &[String], b: &[String]) -> bool {
    a.iter().all(|h| b.contains(h)) && b.iter().all(|h| a.contains(h))
}

/// What a site's limits are derived from.
#[derive(Debug)]
struct Seen {
    mx_hosts: Vec<String>,
    /// Every recipient domain seen going to the site (lowercase).
    domains: HashSet<String>,
}

impl Seen {
    fn limits(&self, rules: &[Rule], default: &Limits) -> Limits {
        site_limits_under(
            rules,
            default,
            &self.mx_hosts,
            self.domains.iter().map(String::as_str),
        )
    }
}

/// The limiter of one site (or site and source) and what its limits come from.
#[derive(Debug)]
struct Site {
    limiter: Arc<DestinationLimiter>,
    seen: Mutex<Seen>,
}

impl Site {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The rule table and the limiter of every destination seen.
pub struct Shaper {
    rules: RwLock<Arc<Vec<Rule>>>,
    default: Limits,
    /// By site key: the site and the egress source.
    live: DashMap<QueueKey, Site>,
    /// The instance's cluster mode, when a cluster backend is configured.
    cluster: Option<Arc<ClusterMode>>,
}

impl std::fmt::Debug for Shaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shaper")
            .field("rules", &self.rules)
            .field("live", &self.live.len())
            .finish_non_exhaustive()
    }
}

impl Shaper {
    /// A shaper with these rules; destinations no rule matches get `default`.
    pub fn new(rules: Vec<Rule>, default: Limits) -> Shaper {
        Shaper {
            rules: RwLock::new(Arc::new(rules)),
            default,
            live: DashMap::new(),
            cluster: None,
        }
    }

    /// The shaper with a cluster backend: rules of [`Scope::Cluster`] are cluster totals,
    /// and fall back to this instance's share of them while `mode` says the backend is
    /// unreachable. Without it, cluster-scoped rules act as local ones.
    pub fn with_cluster(mut self, mode: Arc<ClusterMode>) -> Shaper {
        self.cluster = Some(mode);
        self
    }

    fn rules(&self) -> std::sync::RwLockReadGuard<'_, Arc<Vec<Rule>>> {
        self.rules.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the rules (config reload). Every live limiter takes its new limits in place:
    /// sessions already open keep their slots and count against the new cap (a lowered cap
    /// takes hold as they close), and rates that did not change keep their state.
    pub fn reload(&self, rules: Vec<Rule>) {
        // Held while the limiters are updated, so a site first seen meanwhile cannot be
        // derived from the old rules after its update was missed.
        let mut current = self.rules.write().unwrap_or_else(|p| p.into_inner());
        *current = Arc::new(rules);
        for site in self.live.iter() {
            let limits = site.seen().limits(&current, &self.default);
            site.limiter.update(limits);
        }
    }

    /// The limits the most specific rule gives a domain on its own.
    pub fn limits_for(&self, domain: &str, mx_hosts: &[String]) -> Limits {
        limits_under(
            &self.rules(),
            &self.default,
            &domain.to_ascii_lowercase(),
            mx_hosts,
        )
    }

    /// The live limiter of destination `key` (a site, and the egress source when there is
    /// one), which mail for `domain` is about to use. Its limits are the tightest of those of
    /// every domain seen going to the site: a domain with tighter rules than those seen before
    /// tightens the limiter in place.
    pub fn limiter(
        &self,
        key: &QueueKey,
        domain: &str,
        mx_hosts: &[String],
    ) -> Arc<DestinationLimiter> {
        let domain = domain.to_ascii_lowercase();
        if let Some(site) = self.live.get(key) {
            let seen = site.seen();
            if seen.domains.contains(&domain) && same_hosts(&seen.mx_hosts, mx_hosts) {
                site.limiter.connections.touch();
                return Arc::clone(&site.limiter);
            }
        }
        let rules = self.rules();
        let site = self.live.entry(key.clone()).or_insert_with(|| Site {
            limiter: Arc::new(DestinationLimiter::with_cluster(
                limits_under(&rules, &self.default, &domain, mx_hosts),
                self.cluster.clone(),
            )),
            seen: Mutex::new(Seen {
                mx_hosts: mx_hosts.to_vec(),
                domains: HashSet::from([domain.clone()]),
            }),
        });
        {
            let mut seen = site.seen();
            if !same_hosts(&seen.mx_hosts, mx_hosts) {
                // The site's MX hosts changed: every domain's limits may have.
                seen.mx_hosts = mx_hosts.to_vec();
                seen.domains.insert(domain);
                site.limiter.update(seen.limits(&rules, &self.default));
            } else if seen.domains.insert(domain.clone()) {
                let added = limits_under(&rules, &self.default, &domain, &seen.mx_hosts);
                site.limiter.update(site.limiter.limits().tightest(&added));
            }
        }
        site.limiter.connections.touch();
        Arc::clone(&site.limiter)
    }

    /// Drops the limiters nothing depends on any more: not held outside the shaper, no
    /// connection slot in use, no backoff in force, and unused for `idle` at `now` (or for
    /// as long as their slowest rate needs to forget a permit). Returns how many.
    pub fn evict_idle(&self, now: Instant, idle: Duration) -> usize {
        let mut evicted = 0;
        // `retain` holds each shard's lock, so nobody can take a new handle on a limiter
        // between the check and its removal.
        self.live.retain(|_, site| {
            let keep = Arc::strong_count(&site.limiter) > 1 || !site.limiter.is_idle(now, idle);
            evicted += usize::from(!keep);
            keep
        });
        evicted
    }

    /// Ends the backoff of site `name`, whatever the egress source; returns whether one was
    /// in force.
    pub fn end_backoff(&self, name: &str) -> bool {
        let mut ended = false;
        for entry in self.live.iter() {
            if entry.key().name() == name && entry.value().limiter.is_backing_off() {
                entry.value().limiter.end_backoff();
                ended = true;
            }
        }
        ended
    }

    /// Connection slots in use (open sessions, pooled ones included) per site, summed over
    /// its egress sources; sites with none are left out.
    pub fn connections_by_site(&self) -> Vec<(String, usize)> {
        let mut by_site: std::collections::HashMap<String, usize> = Default::default();
        for entry in self.live.iter() {
            let n = entry.value().limiter.connections_in_use();
            if n > 0 {
                *by_site.entry(entry.key().name().to_owned()).or_default() += n;
            }
        }
        by_site.into_iter().collect()
    }

    /// Destinations currently backing off (`site` or `site|source`, as operators see them),
    /// for the admin view and metrics.
    pub fn backing_off(&self) -> Vec<String> {
        let mut keys: Vec<QueueKey> = self
            .live
            .iter()
            .filter(|e| e.value().limiter.is_backing_off())
            .map(|e| e.key().clone())
            .collect();
        // In the order of the queue listing: a site's sources together.
        keys.sort();
        keys.iter().map(QueueKey::to_string).collect()
    }
}

/// The live rate of one tenant or campaign.
struct KeyedRate {
    rate: Rate,
    gcra: Arc<Gcra>,
    base: Instant,
    last_used_ms: AtomicU64,
}

/// Message rates per tenant or campaign (`[[rate_limit]]`), on top of the destinations'.
#[derive(Default)]
pub struct KeyedRates {
    rates: RwLock<HashMap<String, Rate>>,
    live: DashMap<String, Arc<KeyedRate>>,
}

impl std::fmt::Debug for KeyedRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedRates")
            .field("rates", &self.rates)
            .field("live", &self.live.len())
            .finish()
    }
}

impl KeyedRates {
    /// Rates by key (e.g. `tenant:acme`, `campaign:nov`).
    pub fn new(rates: HashMap<String, Rate>) -> KeyedRates {
        KeyedRates {
            rates: RwLock::new(rates),
            live: DashMap::new(),
        }
    }

    /// Replaces the rates (config reload). A key whose rate is unchanged keeps its state, so
    /// a reload grants no fresh permits; the others start afresh at their new rate.
    pub fn reload(&self, rates: HashMap<String, Rate>) {
        let mut current = self.rates.write().unwrap_or_else(|p| p.into_inner());
        self.live
            .retain(|key, live| rates.get(key) == Some(&live.rate));
        *current = rates;
    }

    /// Takes a permit for one message of `key` if one is free now; otherwise says how long
    /// until the next one (and takes nothing). Keys without a rate always get one.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let rates = self.rates.read().unwrap_or_else(|p| p.into_inner());
        let Some(rate) = rates.get(key) else {
            return Ok(());
        };
        let live = match self.live.get(key) {
            Some(live) => Arc::clone(&live),
            None => Arc::clone(&self.live.entry(key.to_owned()).or_insert_with(|| {
                Arc::new(KeyedRate {
                    rate: *rate,
                    gcra: gcra(rate),
                    base: Instant::now(),
                    last_used_ms: AtomicU64::new(0),
                })
            })),
        };
        drop(rates);
        live.last_used_ms
            .fetch_max(ms_since(live.base, Instant::now()), Ordering::Relaxed);
        check(&live.gcra)
    }

    /// Waits until `key` may send another message, and takes the permit; keys without a
    /// rate never wait.
    pub async fn until_permitted(&self, key: &str) {
        while let Err(wait) = self.check(key) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Drops the state of keys unused for `idle` at `now` (or for as long as their rate needs
    /// to forget a permit, so no permit is granted early). Returns how many.
    pub fn evict_idle(&self, now: Instant, idle: Duration) -> usize {
        let mut evicted = 0;
        self.live.retain(|_, live| {
            let since = ms_since(live.base, now);
            let unused = Duration::from_millis(
                since.saturating_sub(live.last_used_ms.load(Ordering::Relaxed)),
            );
            let keep = Arc::strong_count(live) > 1 || unused < idle.max(live.rate.period());
            evicted += usize::from(!keep);
            keep
        });
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str) -> QueueKey {
        QueueKey::new(name)
    }

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

    fn rule(m: &str, limits: Limits) -> Rule {
        Rule {
            matcher: m.parse().unwrap(),
            limits,
        }
    }

    fn cap(n: usize) -> Limits {
        Limits {
            max_connections: n,
            ..Limits::default()
        }
    }

    fn rate(s: &str) -> Option<Rate> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_site_gets_the_tightest_limits_of_its_domains_whatever_their_order() {
        let rules = || {
            vec![
                rule("mx:*.mx.test", cap(6)),
                rule(
                    "a.test",
                    Limits {
                        max_connections: 4,
                        max_message_rate: rate("10/s"),
                        max_deliveries_per_connection: 50,
                        ..Limits::default()
                    },
                ),
                rule(
                    "b.test",
                    Limits {
                        max_connections: 8,
                        max_message_rate: rate("5/s"),
                        max_connection_rate: rate("1/s"),
                        max_deliveries_per_connection: 20,
                        backoff_max_connections: Some(3),
                        backoff_max_message_rate: rate("2/s"),
                        ..Limits::default()
                    },
                ),
            ]
        };
        let mx = vec!["in1.mx.test".to_owned(), "in2.mx.test".to_owned()];
        let mx_reordered = vec!["in2.mx.test".to_owned(), "in1.mx.test".to_owned()];
        let a_then_b = Shaper::new(rules(), Limits::default());
        let first = a_then_b.limiter(&site("mx.test"), "a.test", &mx);
        let _slots: Vec<_> = (0..3)
            .map(|_| first.try_connection_slot().unwrap())
            .collect();
        let second = a_then_b.limiter(&site("mx.test"), "B.test", &mx_reordered);
        assert!(Arc::ptr_eq(&first, &second), "tightened in place");
        assert_eq!(first.connections_in_use(), 3, "slots held survive");
        let b_then_a = Shaper::new(rules(), Limits::default());
        b_then_a.limiter(&site("mx.test"), "b.test", &mx);
        let other = b_then_a.limiter(&site("mx.test"), "a.test", &mx);
        let expected = Limits {
            max_connections: 4,
            max_message_rate: rate("5/s"),
            max_connection_rate: rate("1/s"),
            max_deliveries_per_connection: 20,
            // a.test backs off to a quarter of its 4 connections, below b.test's 3.
            backoff_max_connections: Some(1),
            // a.test backs off at its normal 10/s, b.test at 2/s.
            backoff_max_message_rate: rate("2/s"),
            backoff_max_connection_rate: None,
            scope: Scope::Local,
        };
        assert_eq!(first.limits(), expected);
        assert_eq!(other.limits(), expected);
        // A third domain with only the site's rule loosens nothing.
        a_then_b.limiter(&site("mx.test"), "c.test", &mx);
        assert_eq!(first.limits(), expected);
        // The same whatever order, case included.
        let c_a_b = Shaper::new(rules(), Limits::default());
        for domain in ["c.test", "A.test", "b.test"] {
            c_a_b.limiter(&site("mx.test"), domain, &mx);
        }
        assert_eq!(
            c_a_b.limiter(&site("mx.test"), "c.test", &mx).limits(),
            expected
        );
        // A site seen only by a domain without rules of its own gets the site's rule.
        let only_c = Shaper::new(rules(), Limits::default());
        assert_eq!(
            only_c.limiter(&site("mx.test"), "c.test", &mx).limits(),
            cap(6)
        );
    }

    #[test]
    fn tightest_is_commutative_and_takes_effective_backoff_values() {
        let slow_backoff = Limits {
            max_connections: 40,
            backoff_max_connections: Some(5),
            max_message_rate: rate("60/m"),
            ..Limits::default()
        };
        let fast = Limits {
            max_connections: 8,
            max_message_rate: rate("1/s"),
            backoff_max_message_rate: rate("10/s"),
            ..Limits::default()
        };
        let both = slow_backoff.tightest(&fast);
        assert_eq!(both, fast.tightest(&slow_backoff));
        assert_eq!(both.max_connections, 8);
        assert_eq!(both.backoff_max_connections, Some(2), "a quarter of 8 < 5");
        // Equal paces: the smaller count, whichever comes first.
        assert_eq!(both.max_message_rate, rate("1/s"));
        // slow_backoff backs off at its normal 60/m, slower than fast's 10/s.
        assert_eq!(both.backoff_max_message_rate, rate("60/m"));
        assert_eq!(fast.tightest(&fast), fast);
    }

    async fn within_a_second(waiter: tokio::task::JoinHandle<ConnectionSlot>) -> ConnectionSlot {
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the waiter was not woken")
            .unwrap()
    }

    #[tokio::test]
    async fn a_reload_lowering_the_cap_counts_the_sessions_already_open() {
        let shaper = Shaper::new(vec![rule("x.test", cap(3))], Limits::default());
        let limiter = shaper.limiter(&site("x.test"), "x.test", &[]);
        let mut held: Vec<_> = (0..3)
            .map(|_| limiter.try_connection_slot().unwrap())
            .collect();
        shaper.reload(vec![rule("x.test", cap(2))]);
        let after = shaper.limiter(&site("x.test"), "x.test", &[]);
        assert!(Arc::ptr_eq(&limiter, &after), "updated in place");
        assert_eq!(after.limits().max_connections, 2);
        assert!(after.over_connection_cap());
        assert!(after.try_connection_slot().is_none(), "3 open, cap 2");
        let waiting = Arc::clone(&after);
        let waiter = tokio::spawn(async move { waiting.connection_slot().await });
        held.pop();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "2 still open: the cap is reached");
        assert_eq!(after.connections_in_use(), 2);
        held.pop();
        let slot = within_a_second(waiter).await;
        assert_eq!(after.connections_in_use(), 2);
        assert!(after.try_connection_slot().is_none());
        // A raised cap lets a waiter through at once.
        let waiting = Arc::clone(&after);
        let waiter = tokio::spawn(async move { waiting.connection_slot().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        shaper.reload(vec![rule("x.test", cap(3))]);
        let _third = within_a_second(waiter).await;
        assert_eq!(after.connections_in_use(), 3);
        drop((slot, held));
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_unchanged_by_a_reload_keeps_its_state() {
        let limits = |n, r| Limits {
            max_connections: n,
            max_message_rate: rate(r),
            ..Limits::default()
        };
        let shaper = Shaper::new(vec![rule("x.test", limits(3, "1/s"))], Limits::default());
        let limiter = shaper.limiter(&site("x.test"), "x.test", &[]);
        limiter.until_message_permitted().await;
        shaper.reload(vec![rule("x.test", limits(5, "1/s"))]);
        let start = tokio::time::Instant::now();
        shaper
            .limiter(&site("x.test"), "x.test", &[])
            .until_message_permitted()
            .await;
        assert!(
            start.elapsed() >= Duration::from_millis(990),
            "no fresh permit after the reload: {:?}",
            start.elapsed()
        );
        // A changed rate applies at once.
        shaper.reload(vec![rule("x.test", limits(5, "10/s"))]);
        let start = tokio::time::Instant::now();
        for _ in 0..3 {
            limiter.until_message_permitted().await;
        }
        assert!(start.elapsed() <= Duration::from_millis(250), "10/s now");
    }

    #[tokio::test(start_paused = true)]
    async fn keyed_rates_keep_their_state_across_a_reload() {
        let rates = |b: &str| -> HashMap<String, Rate> {
            [
                ("tenant:a".to_owned(), "1/s".parse().unwrap()),
                ("tenant:b".to_owned(), b.parse().unwrap()),
            ]
            .into()
        };
        let keyed = KeyedRates::new(rates("1/s"));
        assert_eq!(keyed.check("tenant:a"), Ok(()));
        assert_eq!(keyed.check("tenant:b"), Ok(()));
        let wait = keyed.check("tenant:a").unwrap_err();
        assert!(
            wait > Duration::from_millis(990) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        keyed.reload(rates("2/s"));
        assert!(
            keyed.check("tenant:a").is_err(),
            "unchanged: no fresh burst"
        );
        assert_eq!(keyed.check("tenant:b"), Ok(()), "changed: starts afresh");
        let start = tokio::time::Instant::now();
        keyed.until_permitted("tenant:a").await;
        assert!(start.elapsed() >= Duration::from_millis(990));
        keyed.reload(HashMap::new());
        for _ in 0..3 {
            assert_eq!(keyed.check("tenant:a"), Ok(()), "no rate any more");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn connections_are_counted_per_site_over_its_sources() {
        let shaper = Shaper::new(Vec::new(), Limits::default());
        let a1 = shaper.limiter(&QueueKey::with_source("mx.a", Some("ip1")), "a.test", &[]);
        let a2 = shaper.limiter(&QueueKey::with_source("mx.a", Some("ip2")), "a.test", &[]);
        let b = shaper.limiter(&site("mx.b"), "b.test", &[]);
        let held = [
            a1.try_connection_slot().unwrap(),
            a2.try_connection_slot().unwrap(),
            a2.try_connection_slot().unwrap(),
        ];
        let mut counts = shaper.connections_by_site();
        counts.sort();
        assert_eq!(counts, [("mx.a".to_owned(), 3)]);
        let slot = b.try_connection_slot().unwrap();
        drop(held);
        assert_eq!(shaper.connections_by_site(), [("mx.b".to_owned(), 1)]);
        drop(slot);
        assert!(shaper.connections_by_site().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn ending_a_sites_backoff_ends_it_for_every_source() {
        let shaper = Shaper::new(Vec::new(), Limits::default());
        let hour = Duration::from_secs(3600);
        let keys = [
            QueueKey::with_source("mx.test", Some("ip1")),
            QueueKey::with_source("mx.test", Some("ip2")),
            site("mx.test"),
            site("mx.testing"),
            QueueKey::with_source("mx.testing", Some("ip1")),
        ];
        let limiters: Vec<_> = keys
            .iter()
            .map(|k| shaper.limiter(k, "a.test", &[]))
            .collect();
        for l in &limiters {
            l.back_off(hour);
        }
        assert_eq!(
            shaper.backing_off(),
            [
                "mx.test",
                "mx.test|ip1",
                "mx.test|ip2",
                "mx.testing",
                "mx.testing|ip1"
            ]
        );
        assert!(!shaper.end_backoff("mx"), "a prefix names no site");
        assert!(!shaper.end_backoff("mx.test|ip1"), "a site is named alone");
        assert!(shaper.end_backoff("mx.test"));
        assert_eq!(shaper.backing_off(), ["mx.testing", "mx.testing|ip1"]);
        assert!(!shaper.end_backoff("mx.test"), "none left in force");
        assert!(limiters[4].is_backing_off());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_limiters_are_evicted_but_not_those_in_use() {
        let idle = Duration::from_secs(60);
        let hourly = Limits {
            max_message_rate: rate("1/h"),
            ..Limits::default()
        };
        let shaper = Shaper::new(vec![rule("hourly.test", hourly)], Limits::default());
        let make = |key: &str| shaper.limiter(&site(key), key, &[]);
        let held = make("held.test");
        let slot = make("slot.test").try_connection_slot().unwrap();
        make("back.test").back_off(Duration::from_secs(3600));
        let unused = Arc::downgrade(&make("unused.test"));
        let hourly = Arc::downgrade(&make("hourly.test"));
        tokio::time::advance(Duration::from_secs(30)).await;
        let recent = Arc::downgrade(&make("recent.test"));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(shaper.evict_idle(tokio::time::Instant::now(), idle), 1);
        assert!(unused.upgrade().is_none());
        assert!(recent.upgrade().is_some(), "used 31 s ago");
        assert!(hourly.upgrade().is_some(), "its rate remembers an hour");
        assert_eq!(shaper.backing_off(), vec!["back.test".to_owned()]);
        assert_eq!(
            make("slot.test").connections_in_use(),
            1,
            "the slot still counts"
        );
        drop(slot);
        tokio::time::advance(Duration::from_secs(3600)).await;
        // Only the limiter held outside the shaper is left.
        assert_eq!(shaper.evict_idle(tokio::time::Instant::now(), idle), 4);
        assert!(hourly.upgrade().is_none());
        assert!(Arc::ptr_eq(&held, &make("held.test")));

        let keyed = KeyedRates::new(
            [
                ("tenant:fast".to_owned(), "10/s".parse().unwrap()),
                ("tenant:slow".to_owned(), "1/h".parse().unwrap()),
            ]
            .into(),
        );
        keyed.check("tenant:fast").unwrap();
        keyed.check("tenant:slow").unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(keyed.evict_idle(tokio::time::Instant::now(), idle), 1);
        assert!(
            keyed.check("tenant:slow").is_err(),
            "its permit is remembered"
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

    fn cluster_rule(name: &str, max_connections: usize, rate: Option<&str>) -> Rule {
        rule(
            name,
            Limits {
                max_connections,
                max_message_rate: rate.map(|r| r.parse().unwrap()),
                scope: Scope::Cluster,
                ..Limits::default()
            },
        )
    }

    #[test]
    fn the_local_share_rounds_up_and_stays_within_the_cap() {
        let mode = ClusterMode::new(0.2);
        assert_eq!(mode.share_of(5), 1);
        assert_eq!(mode.share_of(6), 2, "ceil(1.2)");
        assert_eq!(mode.share_of(1), 1);
        assert_eq!(
            ClusterMode::new(0.0).local_share(),
            1.0,
            "no share is no sense"
        );
        assert_eq!(ClusterMode::new(3.0).share_of(4), 4);
        let rate: Rate = "10/s".parse().unwrap();
        assert_eq!(
            mode.share_of_rate(rate).period(),
            Duration::from_millis(500)
        );
        assert!(mode.set_degraded(true));
        assert!(!mode.set_degraded(true), "no transition");
    }

    #[test]
    fn cluster_scope_wins_in_the_tightest_limits() {
        let cluster = Limits {
            max_connections: 5,
            scope: Scope::Cluster,
            ..Limits::default()
        };
        let local = cap(3);
        assert_eq!(cluster.tightest(&local).scope, Scope::Cluster);
        assert_eq!(local.tightest(&cluster).max_connections, 3);
        assert_eq!(local.tightest(&local).scope, Scope::Local);
    }

    #[tokio::test]
    async fn a_cluster_scoped_site_keeps_to_its_share_while_the_backend_is_unreachable() {
        let mode = Arc::new(ClusterMode::new(0.4));
        let shaper = Shaper::new(
            vec![cluster_rule("c.test", 5, None), rule("l.test", cap(5))],
            Limits::default(),
        )
        .with_cluster(Arc::clone(&mode));
        let cluster = shaper.limiter(&site("c.test"), "c.test", &[]);
        let local = shaper.limiter(&site("l.test"), "l.test", &[]);
        assert!(cluster.is_cluster_scoped());
        assert!(!local.is_cluster_scoped());
        assert_eq!(cluster.max_connections_now(), 5, "the cluster total");
        mode.set_degraded(true);
        assert_eq!(cluster.max_connections_now(), 2, "ceil(5 * 0.4)");
        assert_eq!(local.max_connections_now(), 5, "local rules are untouched");
        let held: Vec<_> = (0..2)
            .map(|_| cluster.try_connection_slot().unwrap())
            .collect();
        assert!(cluster.try_connection_slot().is_none());
        let waiting = Arc::clone(&cluster);
        let waiter = tokio::spawn(async move { waiting.connection_slot().await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "degraded: 2 of 2 in use");
        // The backend is back: the waiter is let through without any slot freed.
        mode.set_degraded(false);
        let third = within_a_second(waiter).await;
        assert_eq!(cluster.connections_in_use(), 3);
        // Without a cluster mode, a cluster rule is a local one.
        let plain = Shaper::new(vec![cluster_rule("c.test", 5, None)], Limits::default());
        assert!(!plain
            .limiter(&site("c.test"), "c.test", &[])
            .is_cluster_scoped());
        drop((held, third));
    }

    #[tokio::test(start_paused = true)]
    async fn the_local_rate_of_a_cluster_scoped_site_is_the_share() {
        let mode = Arc::new(ClusterMode::new(0.5));
        let shaper = Shaper::new(
            vec![cluster_rule("c.test", 5, Some("10/s"))],
            Limits::default(),
        )
        .with_cluster(mode);
        let limiter = shaper.limiter(&site("c.test"), "c.test", &[]);
        assert_eq!(limiter.message_rate_now(), Some("10/s".parse().unwrap()));
        let start = tokio::time::Instant::now();
        for _ in 0..11 {
            limiter.until_message_permitted().await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((1.9..=2.1).contains(&took), "5/s locally, took {took}");
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
        let l = Arc::new(l);
        let waiting = Arc::clone(&l);
        let waiter = tokio::spawn(async move { waiting.connection_slot().await });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!waiter.is_finished(), "still backing off");
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!l.is_backing_off());
        assert_eq!(l.max_connections_now(), 8);
        drop(waiter.await.unwrap());
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
