//! What outbound sessions need: the resolver, the pool of idle sessions, the limits, the
//! egress sources; and the session type the pool holds.

use crate::egress::Egress;
use cluster_limits::Lease;
use connection_pool::{Pool, Pooled, SmtpClient, Timeouts};
use rate_limiter::{ConnectionSlot, KeyedRates, Shaper};
use resolver_cache::{Destination, MxResolver};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;

/// The engine's outbound side: where mail goes and over what.
pub(crate) struct Outbound {
    pub(crate) resolver: MxResolver,
    /// Idle sessions by site, each holding its connection slot.
    pub(crate) pool: Pool<Session>,
    pub(crate) shaper: Shaper,
    /// Tenant and campaign rates (`[[rate_limit]]`): outside the reloadable policy, so a
    /// reload keeps the state of the rates it does not change.
    pub(crate) rates: KeyedRates,
    pub(crate) egress: Egress,
    /// Outbound sessions open at once, across every destination (`delivery.max_connections`).
    pub(crate) global_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) ehlo_name: String,
    pub(crate) timeouts: Timeouts,
    /// Leases and shared rates in Redis for cluster-scoped destinations (`[cluster]`).
    pub(crate) cluster: Option<cluster_limits::ClusterLimits>,
}

/// An SMTP session with the connection slots it occupies (its site's and the global one, and
/// the cluster lease of a cluster-scoped site).
pub(crate) struct Session {
    pub(crate) client: SmtpClient,
    pub(crate) _slot: ConnectionSlot,
    pub(crate) _global: OwnedSemaphorePermit,
    pub(crate) lease: Option<Lease>,
}

impl Session {
    /// Whether the session lost its cluster lease (it expired while Redis was unreachable
    /// and others took the room): it must not be reused.
    pub(crate) fn lease_lost(&self) -> bool {
        self.lease.as_ref().is_some_and(Lease::is_lost)
    }

    /// Whether another session, here or on another instance, waits for a lease of this
    /// session's site: idle, it should close and make room rather than be pooled.
    pub(crate) fn lease_wanted(&self) -> bool {
        self.lease.as_ref().is_some_and(Lease::is_wanted)
    }
}

impl Pooled for Session {
    /// An idle session whose cluster lease is lost or wanted elsewhere is not kept: the pool
    /// closes it at the next checkout or reap.
    fn is_usable(&self) -> bool {
        self.client.is_usable() && !self.lease_lost() && !self.lease_wanted()
    }

    fn close(self) -> impl Future<Output = ()> + Send {
        // The slots are released when the session is gone, not before.
        let Session {
            client,
            _slot,
            _global,
            lease,
        } = self;
        async move {
            client.quit().await;
            // The lease first: a local waiter woken by the slot then finds room in Redis.
            if let Some(lease) = lease {
                lease.release().await;
            }
            drop((_slot, _global));
        }
    }
}

/// The MX host names of a destination, as shaping and TLS rules match them.
pub(crate) fn mx_hosts(dest: &Destination) -> Vec<String> {
    dest.hosts.iter().map(|h| h.name.clone()).collect()
}
