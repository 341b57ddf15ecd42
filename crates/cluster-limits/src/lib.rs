//! Cluster-wide limits: connection leases and GCRA message rates kept in Redis and shared by
//! every Drover instance, for the `[[shaping]]` rules marked `scope = "cluster"`.
//!
//! - A **lease** is one open SMTP session of a destination, somewhere in the cluster: a member
//!   of a sorted set per destination, scored by its expiry. Acquiring purges the expired ones
//!   and adds the lease only while fewer than the cap are left, in one Lua script (EVALSHA),
//!   so no two instances can both take the last one. A background heartbeat renews the leases
//!   this instance holds; an instance that crashes stops renewing, and its leases expire
//!   after `lease_ttl` and come back to the others. A caller finding the cap reached sets a
//!   short-lived "wanted" flag; the heartbeat reads it every second, so instances close idle
//!   sessions of that destination instead of keeping them pooled ([`Lease::is_wanted`]).
//! - A **rate** is the standard GCRA on a theoretical arrival time (TAT) stored per key, in
//!   another script; every instance draws from the same TAT. Times are Redis's own (`TIME`),
//!   so the instances' clocks need not agree.
//!
//! Every call has a short timeout. When one fails, the instance falls back: it flips the
//! shared [`rate_limiter::ClusterMode`] to degraded (the `Shaper` then holds cluster-scoped
//! destinations to this instance's `local_share` of their limits), sets the
//! [`FALLBACK`] gauge, logs once, and stops calling Redis on the delivery path; the
//! heartbeat probes Redis and lifts the fallback when it answers again.
//!
//! The decisions (key names, lease ids, health transitions, waits) are in [`logic`], without
//! I/O; [`ClusterLimits`] is the edge that talks to Redis.

mod backend;
pub mod logic;
mod scripts;
#[cfg(feature = "testing")]
pub mod testing;

pub use backend::{ClusterLimits, Lease};
pub use logic::Settings;

use std::time::Duration;

/// 1 while the cluster limits fall back to the local share (Redis unreachable), else 0.
pub const FALLBACK: &str = "drover_cluster_limits_fallback";
/// Redis calls of the cluster limits that failed or timed out.
pub const REDIS_ERRORS: &str = "drover_cluster_redis_errors_total";
/// Connection leases this instance holds in Redis.
pub const LEASES: &str = "drover_cluster_leases";

/// Registers the descriptions of this crate's metrics.
pub fn describe_metrics() {
    metrics::describe_gauge!(
        FALLBACK,
        "1 while cluster-scoped limits fall back to this instance's local share because Redis is unreachable, else 0."
    );
    metrics::describe_counter!(
        REDIS_ERRORS,
        "Redis calls of the cluster-wide limits that failed or timed out."
    );
    metrics::describe_gauge!(
        LEASES,
        "Cluster connection leases this instance holds in Redis."
    );
}

/// Errors of the cluster limits.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `redis_url` does not parse.
    #[error("invalid redis_url {url:?}: {message}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why.
        message: String,
    },
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer in time.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// The limits are in fallback (Redis unreachable): use the local share.
    #[error("cluster limits unavailable: redis is unreachable")]
    Unavailable,
}

/// Checks that `url` is a Redis URL this crate can connect to (without connecting).
pub fn check_url(url: &str) -> Result<(), ClusterError> {
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| ClusterError::BadUrl {
            url: url.to_owned(),
            message: e.to_string(),
        })
}
