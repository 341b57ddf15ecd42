//! Starting an engine: open the spool, accounting and resolver, settle what the last stop
//! left, then run the reload, the dispatcher, housekeeping and the checkpoint keeper.

use crate::config::Config;
use crate::crew::Crew;
use crate::egress::Egress;
use crate::engine::{Engine, EngineError};
use crate::finalizer::Finalizer;
use crate::outbound::Outbound;
use crate::policy::Policy;
use crate::telemetry::describe_metrics;
use accounting::Accounting;
use cluster_limits::ClusterLimits;
use connection_pool::Pool;
use queue::{Scheduler, Spool, SpoolOptions};
use rate_limiter::{ClusterMode, KeyedRates, Limits, Shaper};
use resolver_cache::{MxResolver, ResolverSettings};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Where the generated feedback key is kept when `[bounce_processing] keys` is unset.
const FEEDBACK_KEY: &str = "feedback/key";

/// The keys that tag VERP addresses and unsubscribe links: the configured ones, or one
/// generated at the first start and kept in the spool, so links in mail already sent keep
/// working across restarts.
async fn feedback_keys(config: &Config, spool: &Spool) -> Result<feedback::Keys, EngineError> {
    let configured = &config.bounce_processing.keys;
    let secrets: Vec<Vec<u8>> = if configured.is_empty() {
        match spool.state(FEEDBACK_KEY)? {
            Some(key) => vec![key],
            None => {
                let key: [u8; 32] = rand::random();
                spool.put_state(FEEDBACK_KEY, key.to_vec()).await?;
                vec![key.to_vec()]
            }
        }
    } else {
        configured.iter().map(|k| k.as_bytes().to_vec()).collect()
    };
    feedback::Keys::new(&secrets).map_err(|e| EngineError::Config(e.to_string()))
}

impl Engine {
    /// Opens the spool and accounting, reloads queued messages and starts delivering.
    pub async fn start(config: Config) -> Result<Arc<Engine>, EngineError> {
        describe_metrics();
        std::fs::create_dir_all(&config.spool.path).map_err(|e| {
            EngineError::Config(format!("spool.path {}: {e}", config.spool.path.display()))
        })?;
        let spool = Spool::open(
            &config.spool.path,
            SpoolOptions {
                sync: config.spool.sync,
                body_buffer_bytes: config.spool.body_buffer_mb.saturating_mul(1 << 20),
                memory_budget_bytes: config.spool.memory_budget_mb.saturating_mul(1 << 20),
                message_id_retention: config.bounce_processing.sent_retention.0,
                ..SpoolOptions::default()
            },
        )?;
        let accounting = Accounting::open_full(
            &config.accounting_path(),
            config.accounting.rotation(),
            config
                .accounting
                .csv_format()
                .map_err(|e| EngineError::Config(e.to_string()))?,
        )?;
        let feedback_keys = feedback_keys(&config, &spool).await?;
        let nameservers = config
            .dns
            .nameservers
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| EngineError::Config(format!("dns.nameservers: {e}")))?;
        let resolver = MxResolver::new(ResolverSettings {
            nameservers,
            smtp_port: config.delivery.smtp_port,
            timeout: config.dns.timeout.0,
            attempts: config.dns.attempts,
            max_in_flight: config.dns.max_in_flight,
            routes: config
                .route
                .iter()
                .map(|r| (r.domain.to_ascii_lowercase(), r.hosts.clone()))
                .collect(),
            ..ResolverSettings::default()
        })?;
        let rules = config
            .shaping_rules()
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let mut shaper = Shaper::new(rules, Limits::default());
        let cluster = match &config.cluster {
            Some(cluster) => {
                let mode = Arc::new(ClusterMode::new(cluster.local_share));
                shaper = shaper.with_cluster(Arc::clone(&mode));
                let limits = ClusterLimits::start(cluster.settings(&hostname()), mode)
                    .await
                    .map_err(|e| EngineError::Config(e.to_string()))?;
                Some(limits)
            }
            None => None,
        };
        let rates = KeyedRates::new(
            config
                .keyed_rates()
                .map_err(|e| EngineError::Config(e.to_string()))?,
        );
        let ehlo_name = if config.delivery.ehlo_name.is_empty() {
            hostname()
        } else {
            config.delivery.ehlo_name.clone()
        };
        let timeouts = config.delivery.timeouts();
        let egress = Egress::from_config(&config);
        let global_slots = Arc::new(tokio::sync::Semaphore::new(config.delivery.max_connections));
        let policy = std::sync::RwLock::new(Arc::new(
            Policy::from_config(&config).map_err(|e| EngineError::Config(e.to_string()))?,
        ));
        let cancel = CancellationToken::new();
        let finalizer = Finalizer::new(accounting.clone(), spool.clone(), cancel.clone());
        let engine = Arc::new(Engine {
            site_metrics: crate::site_metrics::SiteMetrics::new(config.metrics.top_sites),
            activity: Default::default(),
            finalizer,
            webhooks: Default::default(),
            outbound: Outbound {
                resolver,
                pool: Pool::new(config.delivery.idle_timeout.0),
                shaper,
                rates,
                egress,
                global_slots,
                ehlo_name,
                timeouts,
                cluster,
            },
            config,
            spool,
            scheduler: Scheduler::new(),
            accounting,
            crew: Crew::default(),
            policy,
            cancel,
            draining: AtomicBool::new(false),
            reloading: Arc::new(AtomicBool::new(true)),
            feedback_keys,
            generator: Default::default(),
            drains: Default::default(),
        });
        engine.load_suspensions()?;
        // Before the listeners open: a scale-down an earlier run began refuses mail at once.
        engine.resume_drain()?;
        engine
            .scheduler
            .set_tenant_weights(engine.config.tenant_weights());
        // Before anything is delivered: messages whose final record was written just before
        // the last stop are removed, not delivered again.
        let settled = engine.finalizer.settle().await?;
        let checkpoint = settled.checkpoint;
        // The reload streams the spool while delivery already runs, so a large queue does
        // not delay the first delivery.
        let reloading = Arc::clone(&engine);
        // Before anything can be injected or delivered, so that every message this process
        // finishes during the reload is remembered.
        engine.scheduler.begin_reload();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = reloading.reload_spool(&settled) {
                tracing::error!(error = %e, "reloading the spool failed; some messages wait for the next start");
            }
            reloading.scheduler.end_reload();
            reloading.reloading.store(false, Ordering::SeqCst);
        });
        tokio::spawn(Arc::clone(&engine).dispatch());
        engine.start_generator();
        tokio::spawn(Arc::clone(&engine).reap_idle_sessions());
        engine.start_webhooks().await?;
        tokio::spawn(Arc::clone(&engine).keep_log());
        let keeper = Arc::clone(&engine);
        tokio::spawn(async move { keeper.finalizer.keep_checkpoint(checkpoint).await });
        Ok(engine)
    }
}
