//! The engine: owns the spool, the schedule, accounting and the delivery workers.
//!
//! Flow: injection stores a message (synced) and puts its id on the ready queue of its
//! destination; the dispatcher starts workers for destinations with ready messages, up to the
//! destination's connection cap; a worker holds one SMTP session and delivers that
//! destination's messages one after another, then parks the session in the pool.

use crate::clock::now_ms;
use crate::config::Config;
use crate::crew::Crew;
use crate::finalizer::Finalizer;
use crate::outbound::Outbound;
use crate::policy::Policy;
use accounting::{Accounting, Record, RecordType};
use queue::{MessageMeta, Scheduler, Spool};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(crate) use crate::error::state_u64;
pub use crate::error::{EngineError, Unsignable};

/// Shared state of a running engine. The work is done in the modules around it, one concern
/// each: `startup` and `restore` (start-up and reload), `inject`, `admin`, `dispatch`,
/// `worker`, `outcome` (pure), `record` and `finalizer`.
pub struct Engine {
    pub(crate) config: Config,
    pub(crate) spool: Spool,
    pub(crate) scheduler: Scheduler,
    pub(crate) accounting: Accounting,
    /// Exactly one final record per message (see `finalizer`).
    pub(crate) finalizer: Finalizer,
    /// The `[[webhook]]` senders (see `webhooks`).
    pub(crate) webhooks: crate::webhooks::Webhooks,
    /// Resolver, sessions, limits and sources of outbound mail.
    pub(crate) outbound: Outbound,
    /// The delivery workers.
    pub(crate) crew: Crew,
    /// The parts of the configuration a reload (SIGHUP) replaces.
    pub(crate) policy: std::sync::RwLock<Arc<Policy>>,
    pub(crate) cancel: CancellationToken,
    pub(crate) draining: AtomicBool,
    /// True while the start-up reload of the spool runs: the engine already delivers, but it
    /// does not know every queued message yet, so it does not say it is ready.
    pub(crate) reloading: Arc<AtomicBool>,
    /// Tag VERP addresses and unsubscribe links (`startup::feedback_keys`).
    pub(crate) feedback_keys: feedback::Keys,
    /// Inject requests stored for deferred generation (see `generator`).
    pub(crate) generator: crate::generator::Generator,
    /// The per-site metric series (`site_metrics`).
    pub(crate) site_metrics: crate::site_metrics::SiteMetrics,
    /// The status page's recent history (`activity`).
    pub(crate) activity: std::sync::Mutex<crate::activity::Activity>,
    /// Messages moving to and from other instances (`drain`).
    pub(crate) drains: crate::drain::Drains,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// The reloadable policy in force.
    pub(crate) fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies a new configuration's shaping, automation, TLS and rate rules and `[[dkim]]`
    /// keys (SIGHUP) without dropping sessions or messages. Other settings need a restart;
    /// they are left as they are.
    pub fn reload_policy(&self, config: &Config) -> Result<(), EngineError> {
        config
            .validate()
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let rules = config
            .shaping_rules()
            .map_err(|e| EngineError::Config(e.to_string()))?;
        self.check_cluster_reload(config, &rules)?;
        let rates = config
            .keyed_rates()
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let policy =
            Arc::new(Policy::from_config(config).map_err(|e| EngineError::Config(e.to_string()))?);
        self.outbound.shaper.reload(rules);
        self.outbound.rates.reload(rates);
        self.scheduler.set_tenant_weights(config.tenant_weights());
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
        tracing::info!(
            "reloaded shaping, automation, TLS, rate and classification rules, tenant weights, stamping and DKIM keys"
        );
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Our host name: EHLO name of outbound sessions, banner of the SMTP listener.
    pub fn ehlo_name(&self) -> &str {
        &self.outbound.ehlo_name
    }

    /// Delivery workers running now (at most `delivery.max_workers`).
    pub fn workers_running(&self) -> usize {
        self.crew.running.load(Ordering::SeqCst)
    }

    /// The spool (for tools and tests that look below the API).
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Where each `[[webhook]]` stands and how far behind it is (for the admin API).
    pub fn webhook_statuses(&self) -> Vec<webhook::WebhookStatus> {
        self.webhooks.statuses()
    }

    /// The schedule (for the admin API).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Whether the spool accepts writes; false while it is read-only after a storage error
    /// (injection then answers 503, deliveries wait).
    pub fn spool_writable(&self) -> bool {
        self.spool.is_writable()
    }

    /// Whether shutdown has begun, or a drain of the whole queue to a peer (`drover drain`)
    /// runs or has finished: either way the engine takes no new mail.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst) || self.drains.scaling_down()
    }

    /// Whether shutdown has begun (unlike [`Engine::is_draining`], not a drain to a peer).
    pub(crate) fn is_stopping(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether the start-up reload of the spool still runs.
    pub fn is_reloading(&self) -> bool {
        self.reloading.load(Ordering::SeqCst)
    }

    /// Refuses new messages from now on (`/readyz` and injection answer 503) while the
    /// listeners stay up, so a load balancer takes the instance out before they close.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Puts a message back on the schedule under its queue (after an attempt): the domain,
    /// and its egress source when sources are configured (each source has its own sessions
    /// and limits).
    pub(crate) fn enqueue(&self, meta: &MessageMeta) {
        self.put_on_schedule(meta, false);
    }

    /// Queues a message just accepted or found by the spool reload, unless this process
    /// already has it in hand: the reload and the injection race for the messages accepted
    /// while it runs, and neither may re-queue one that is in flight or finished. Returns
    /// whether it was queued.
    pub(crate) fn enqueue_new(&self, meta: &MessageMeta) -> bool {
        self.put_on_schedule(meta, true)
    }

    fn put_on_schedule(&self, meta: &MessageMeta, only_new: bool) -> bool {
        let key = self.outbound.egress.queue_for(meta);
        let place = if only_new {
            Scheduler::restore_with
        } else {
            Scheduler::schedule_with
        };
        let tags = queue::Tags {
            campaign: meta.campaign.as_deref(),
            tenant: meta.tenant.as_deref(),
            priority: meta.priority,
        };
        place(
            &self.scheduler,
            meta.id,
            &key,
            &tags,
            meta.due_ms,
            meta.received_ms,
            now_ms(),
        )
    }

    pub(crate) fn record(&self, kind: RecordType, meta: &MessageMeta) -> Record {
        let mut r = Record::new(kind, meta.id.to_string());
        r.sender = meta.sender.clone();
        r.recipient = meta.recipient.clone();
        r.domain = meta.domain.clone();
        r.campaign = meta.campaign.clone();
        r.tenant = meta.tenant.clone();
        r.attempt = meta.attempts;
        r.queue_time_ms = now_ms().saturating_sub(meta.received_ms);
        r.headers = meta.headers.clone();
        r.metadata = meta.metadata.clone();
        r
    }

    /// Stops accepting, lets workers finish their current message (up to `grace`), closes
    /// sessions and the spool.
    pub async fn shutdown(&self, grace: Duration) {
        self.begin_drain();
        self.cancel.cancel();
        self.crew.tracker.close();
        if tokio::time::timeout(grace, self.crew.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("workers still busy after {grace:?}; their messages stay spooled");
        }
        self.outbound.pool.close().await;
        self.finalizer.close().await;
        // Flushing the WAL waits for the disk: not on an async worker thread.
        let spool = self.spool.clone();
        match tokio::task::spawn_blocking(move || spool.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "spool flush at shutdown failed"),
            Err(e) => tracing::error!(error = %e, "spool flush at shutdown failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_values_round_trip() {
        assert_eq!(state_u64(&1234u64.to_be_bytes()), Some(1234));
        assert_eq!(state_u64(b"short"), None);
    }
}
