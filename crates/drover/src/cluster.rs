//! Cluster-wide limits on the delivery path (`[cluster]`, shaping rules with
//! `scope = "cluster"`): a session of a cluster-scoped destination holds a Redis lease besides
//! its local slot, and its messages and new connections take permits of the shared GCRA rates.
//! Local-scope destinations never reach Redis. When Redis is unreachable the limiter keeps to
//! this instance's share (see `rate_limiter::ClusterMode`), and sessions open without a lease.

use crate::config::Config;
use crate::engine::Engine;
use crate::error::EngineError;
use cluster_limits::logic::RateKind;
use cluster_limits::Lease;
use queue_key::QueueKey;
use rate_limiter::{ConnectionSlot, DestinationLimiter, Rule, Scope};

impl Engine {
    /// A reload cannot start or change the cluster backend (it is set up at start): rules
    /// scoped to the cluster are refused when the engine started without `[cluster]`, and a
    /// changed `[cluster]` is reported as waiting for a restart.
    pub(crate) fn check_cluster_reload(
        &self,
        config: &Config,
        rules: &[Rule],
    ) -> Result<(), EngineError> {
        if self.outbound.cluster.is_none() {
            if let Some(i) = rules.iter().position(|r| r.limits.scope == Scope::Cluster) {
                return Err(EngineError::Config(format!(
                    "shaping[{i}].scope: \"cluster\" needs the [cluster] backend, which starts only with the engine: restart to add it"
                )));
            }
        }
        if config.cluster != self.config.cluster {
            tracing::warn!("[cluster] changed: the change takes effect at the next restart");
        }
        Ok(())
    }

    /// Waits for a connection slot of `limiter`'s destination and, if its limits are
    /// cluster-wide, a lease in Redis too. While Redis is unreachable, the slot alone does,
    /// within this instance's share of the cap. `None`: cancelled.
    pub(crate) async fn connection_slot(
        &self,
        site_key: &QueueKey,
        limiter: &DestinationLimiter,
    ) -> Option<(ConnectionSlot, Option<Lease>)> {
        let destination = site_key.to_string();
        loop {
            let slot = tokio::select! {
                _ = self.cancel.cancelled() => return None,
                slot = limiter.connection_slot() => slot,
            };
            let Some(cluster) = self
                .outbound
                .cluster
                .as_ref()
                .filter(|_| limiter.is_cluster_scoped())
            else {
                return Some((slot, None));
            };
            let leased = tokio::select! {
                _ = self.cancel.cancelled() => return None,
                leased = cluster.acquire(&destination, limiter.max_connections_now()) => leased,
            };
            match leased {
                Ok(lease) => return Some((slot, Some(lease))),
                // Fallen back meanwhile: the slot counts against the local share now, and is
                // kept only if it fits under it.
                Err(_) if limiter.connections_in_use() <= limiter.max_connections_now() => {
                    return Some((slot, None))
                }
                Err(_) => drop(slot),
            }
        }
    }

    /// Waits until another message may go to `limiter`'s destination: the shared rate for a
    /// cluster-scoped one (the local share while Redis is unreachable), else the local rate.
    pub(crate) async fn until_message_permitted(
        &self,
        site_key: &QueueKey,
        limiter: &DestinationLimiter,
    ) {
        self.until_permitted(RateKind::Messages, site_key, limiter)
            .await
    }

    /// Waits until a new connection may be opened to `limiter`'s destination (as
    /// [`Engine::until_message_permitted`], for the connection rate).
    pub(crate) async fn until_connection_permitted(
        &self,
        site_key: &QueueKey,
        limiter: &DestinationLimiter,
    ) {
        self.until_permitted(RateKind::Connections, site_key, limiter)
            .await
    }

    async fn until_permitted(
        &self,
        kind: RateKind,
        site_key: &QueueKey,
        limiter: &DestinationLimiter,
    ) {
        let rate = match kind {
            RateKind::Messages => limiter.message_rate_now(),
            RateKind::Connections => limiter.connection_rate_now(),
        };
        if let (Some(cluster), Some(rate)) = (self.outbound.cluster.as_ref(), rate) {
            if limiter.is_cluster_scoped() {
                limiter.touch();
                let shared = cluster
                    .until_permitted(kind, &site_key.to_string(), rate)
                    .await;
                if shared.is_ok() {
                    return;
                }
            }
        }
        match kind {
            RateKind::Messages => limiter.until_message_permitted().await,
            RateKind::Connections => limiter.until_connection_permitted().await,
        }
    }
}
