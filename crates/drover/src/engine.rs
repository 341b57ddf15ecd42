//! The engine: owns the spool, the schedule, accounting and the delivery workers.
//!
//! Flow: injection stores a message (synced) and puts its id on the ready queue of its
//! destination; the dispatcher starts workers for destinations with ready messages, up to the
//! destination's connection cap; a worker holds one SMTP session and delivers that
//! destination's messages one after another, then parks the session in the pool.

use crate::automation::Automation;
use crate::config::Config;
use crate::config::ShapingConfig;
use crate::delivery::{Session, AUTOMATION, DELIVERY_DURATION};
use crate::egress::Egress;
pub use crate::message::{NewMessage, Origin};
use accounting::{Accounting, BounceCategory, Record, RecordType, Response};
use connection_pool::{Pool, Timeouts};
use dashmap::DashMap;
use queue::{MessageId, MessageMeta, Scheduler, Selector, Spool, SpoolOptions};
use rate_limiter::{KeyedRates, Limits, Shaper};
use resolver_cache::{MxResolver, ResolveError, ResolverSettings};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const RECEIVED: &str = "drover_messages_received_total";
const DKIM_SIGNATURES: &str = "drover_dkim_signatures_total";

/// Registers the descriptions of every metric (contract §5).
pub fn describe_metrics() {
    metrics::describe_counter!(RECEIVED, "Messages accepted into the spool, by channel.");
    metrics::describe_counter!(
        DKIM_SIGNATURES,
        "Injected messages by DKIM outcome: signed, unsigned (no [[dkim]] key for the From \
         domain) or error (refused as unsignable)."
    );
    metrics::describe_counter!(
        AUTOMATION,
        "Reactions of [[automation]] rules to receivers' replies, by action."
    );
    metrics::describe_gauge!(
        HOLDS,
        "Operator and automation holds in force, by kind (domain, campaign)."
    );
    metrics::describe_gauge!(
        BACKOFF,
        "Destinations whose automation backoff limits are in force."
    );
    metrics::describe_histogram!(
        DELIVERY_DURATION,
        metrics::Unit::Seconds,
        "Time from the start of a transaction to its final reply."
    );
    accounting::describe_metrics();
    queue::describe_metrics();
    connection_pool::describe_metrics();
    resolver_cache::describe_metrics();
    // Series exist from the first scrape, so dashboards and rate() see a zero, not a gap.
    for via in ["http", "smtp"] {
        metrics::counter!(RECEIVED, "via" => via).increment(0);
    }
    for result in ["signed", "unsigned", "error"] {
        metrics::counter!(DKIM_SIGNATURES, "result" => result).increment(0);
    }
    metrics::counter!("drover_messages_delivered_total").increment(0);
    metrics::counter!("drover_messages_transient_failures_total").increment(0);
    metrics::counter!("drover_messages_expired_total").increment(0);
    for category in accounting::BounceCategory::ALL {
        metrics::counter!("drover_messages_bounced_total", "category" => category.as_str())
            .increment(0);
    }
    for result in ["cache_hit", "ok", "nxdomain", "error"] {
        metrics::counter!("drover_dns_lookups_total", "result" => result).increment(0);
    }
    metrics::gauge!("drover_smtp_connections").increment(0.0);
}

const SUSPEND_PREFIX: &str = "suspend/";
/// Messages a purge records and deletes per write.
const PURGE_CHUNK: usize = 10_000;
/// How often the accounting checkpoint (see `finals`) is advanced.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// How many due messages a restart schedules before the full reload scan.
const DUE_FIRST: usize = 100_000;
pub(crate) const HOLDS: &str = "drover_holds";
pub(crate) const BACKOFF: &str = "drover_backoff_destinations";

fn suspend_key(selector: &Selector) -> String {
    match selector {
        Selector::Domain(d) => format!("{SUSPEND_PREFIX}domain/{d}"),
        Selector::Campaign(c) => format!("{SUSPEND_PREFIX}campaign/{c}"),
    }
}

fn selector_from_key(key: &str) -> Option<Selector> {
    let rest = key.strip_prefix(SUSPEND_PREFIX)?;
    if let Some(d) = rest.strip_prefix("domain/") {
        return Some(Selector::Domain(d.to_owned()));
    }
    rest.strip_prefix("campaign/")
        .map(|c| Selector::Campaign(c.to_owned()))
}

/// Engine state records that hold a time or an offset store it as a big-endian u64.
fn state_u64(value: &[u8]) -> Option<u64> {
    value
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why the engine could not start or accept.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] queue::QueueError),
    /// Accounting failed.
    #[error(transparent)]
    Accounting(#[from] accounting::AccountingError),
    /// The resolver could not be set up.
    #[error(transparent)]
    Resolver(#[from] ResolveError),
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    Draining,
    /// The queue holds `spool.max_queued` messages already.
    #[error("the queue is full ({0} messages)")]
    Full(usize),
    /// Some messages cannot be DKIM-signed although a key applies (malformed headers); nothing
    /// was stored, and the messages come back unchanged.
    #[error("{0}")]
    Unsignable(Box<Unsignable>),
    /// Signing stopped abnormally.
    #[error("signing failed: {0}")]
    Signing(String),
}

/// Messages handed back by [`Engine::accept`] because some of them cannot be signed.
pub struct Unsignable {
    /// Position (in the batch) and reason of each message that cannot be signed.
    pub failures: Vec<(usize, dkim::DkimError)>,
    /// The whole batch, unchanged: the caller may retry without the failed ones.
    pub messages: Vec<NewMessage>,
}

impl std::fmt::Debug for Unsignable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unsignable")
            .field("failures", &self.failures)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Display for Unsignable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.failures.first() {
            Some((_, e)) => write!(f, "DKIM signing failed: {e}"),
            None => write!(f, "DKIM signing failed"),
        }
    }
}

/// Signs every message whose From domain has a key; all or nothing. Returns the batch with
/// signed bodies and how many were signed.
fn sign_all(
    signers: &dkim::Signers,
    mut messages: Vec<NewMessage>,
) -> Result<(Vec<NewMessage>, u64), Box<Unsignable>> {
    let mut signed = Vec::with_capacity(messages.len());
    let mut failures = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        match signers.sign(&m.body) {
            Ok(body) => signed.push(body),
            Err(e) => {
                failures.push((i, e));
                signed.push(None);
            }
        }
    }
    if !failures.is_empty() {
        return Err(Box::new(Unsignable { failures, messages }));
    }
    let mut count = 0;
    for (m, body) in messages.iter_mut().zip(signed) {
        if let Some(body) = body {
            m.meta.size = body.len() as u64;
            m.body = body;
            count += 1;
        }
    }
    Ok((messages, count))
}

/// Shared state of a running engine.
pub struct Engine {
    pub(crate) config: Config,
    pub(crate) spool: Spool,
    pub(crate) scheduler: Scheduler,
    pub(crate) accounting: Accounting,
    pub(crate) resolver: MxResolver,
    /// Idle sessions by site, each holding its connection slot.
    pub(crate) pool: Pool<Session>,
    pub(crate) shaper: Shaper,
    /// `[[rate_limit]]` rates per tenant and campaign: outside `policy`, so that a reload
    /// updates them instead of starting them afresh.
    pub(crate) rates: KeyedRates,
    pub(crate) egress: Egress,
    /// The parts of the configuration a reload (SIGHUP) replaces.
    policy: std::sync::RwLock<Arc<Policy>>,
    /// Outbound sessions open at once, across every destination (`delivery.max_connections`).
    pub(crate) global_slots: Arc<tokio::sync::Semaphore>,
    /// Delivery workers running per queue.
    pub(crate) active: DashMap<String, usize>,
    /// Delivery workers running in all (`delivery.max_workers`).
    pub(crate) workers_running: std::sync::atomic::AtomicUsize,
    /// Some queue with ready mail found no worker in the last dispatcher pass: busy workers
    /// hand over after their turn.
    pub(crate) starving: AtomicBool,
    pub(crate) ehlo_name: String,
    pub(crate) timeouts: Timeouts,
    pub(crate) cancel: CancellationToken,
    pub(crate) workers: TaskTracker,
    draining: AtomicBool,
    /// True while the start-up reload of the spool runs: the engine already delivers, but it
    /// does not know every queued message yet, so it does not say it is ready.
    reloading: Arc<AtomicBool>,
    /// Finalizations between their record and their message's removal (see `finals`).
    pub(crate) ledger: crate::finals::Ledger,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
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
                ..SpoolOptions::default()
            },
        )?;
        let accounting = Accounting::open(&config.accounting_path())?;
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
        let shaper = Shaper::new(rules, Limits::default());
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
        let policy = std::sync::RwLock::new(Arc::new(Policy::from_config(&config)?));
        let engine = Arc::new(Engine {
            pool: Pool::new(config.delivery.idle_timeout.0),
            config,
            spool,
            scheduler: Scheduler::new(),
            accounting,
            resolver,
            shaper,
            rates,
            egress,
            policy,
            global_slots,
            active: DashMap::new(),
            workers_running: std::sync::atomic::AtomicUsize::new(0),
            starving: AtomicBool::new(false),
            ehlo_name,
            timeouts,
            cancel: CancellationToken::new(),
            workers: TaskTracker::new(),
            draining: AtomicBool::new(false),
            reloading: Arc::new(AtomicBool::new(true)),
            ledger: crate::finals::Ledger::default(),
        });
        engine.load_suspensions()?;
        // Before anything is delivered: messages whose final record was written just before
        // the last stop are removed, not delivered again.
        let checkpoint = engine.settle_recorded_finals().await?;
        // The reload streams the spool while delivery already runs, so a large queue does
        // not delay the first delivery.
        let reloading = Arc::clone(&engine);
        // Before anything can be injected or delivered, so that every message this process
        // finishes during the reload is remembered.
        engine.scheduler.begin_reload();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = reloading.reload_spool() {
                tracing::error!(error = %e, "reloading the spool failed; some messages wait for the next start");
            }
            reloading.scheduler.end_reload();
            reloading.reloading.store(false, Ordering::SeqCst);
        });
        tokio::spawn(Arc::clone(&engine).dispatch());
        tokio::spawn(Arc::clone(&engine).reap_idle_sessions());
        tokio::spawn(Arc::clone(&engine).keep_checkpoint(checkpoint));
        Ok(engine)
    }

    fn reload_spool(&self) -> Result<(), EngineError> {
        let mut count = 0u64;
        // What is due goes first, straight from the schedule index, so delivery restarts in
        // moments however large the queue; the full scan then adds the rest (messages already
        // scheduled are left as they are).
        for id in self.spool.due_ids(now_ms(), DUE_FIRST)? {
            if let Some(meta) = self.spool.meta(&id)? {
                self.enqueue_new(&meta);
            }
        }
        for meta in self.spool.scan() {
            if self.cancel.is_cancelled() {
                break;
            }
            match meta {
                Ok(meta) => {
                    if self.enqueue_new(&meta) {
                        count += 1;
                    }
                }
                // One bad record must not keep every other message from being delivered.
                Err(e) => tracing::error!(error = %e, "skipping an unreadable spool record"),
            }
        }
        if count > 0 {
            tracing::info!(messages = count, "reloaded the spool");
        }
        Ok(())
    }

    /// Removes the spooled messages that already have a final record after the stored
    /// accounting checkpoint (the engine stopped between a record and its message's removal),
    /// and stores a checkpoint if there was none. Returns the checkpoint in force.
    async fn settle_recorded_finals(&self) -> Result<u64, EngineError> {
        let stored = self
            .spool
            .state(crate::finals::CHECKPOINT_KEY)?
            .and_then(|v| state_u64(&v));
        let Some(checkpoint) = stored else {
            // A new spool: none of its messages can have a record before this point.
            let len = self.accounting.synced_len();
            self.store_checkpoint(len).await?;
            return Ok(len);
        };
        let path = self.accounting.path().to_owned();
        let recorded = accounting::final_ids_since(&path, checkpoint).map_err(|source| {
            EngineError::Accounting(accounting::AccountingError::Io { path, source })
        })?;
        let mut removed = 0u64;
        for id in recorded
            .iter()
            .filter_map(|id| id.parse::<MessageId>().ok())
        {
            if let Some(meta) = self.spool.meta(&id)? {
                self.spool.remove(id, meta.due_ms).await?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed messages whose final record was written before the last stop"
            );
        }
        Ok(checkpoint)
    }

    async fn store_checkpoint(&self, offset: u64) -> Result<(), EngineError> {
        self.spool
            .put_state(crate::finals::CHECKPOINT_KEY, offset.to_be_bytes().to_vec())
            .await?;
        Ok(())
    }

    /// Advances the accounting checkpoint about once a second, so a restart reads only the
    /// last moments of the accounting file.
    async fn keep_checkpoint(self: Arc<Self>, mut stored: u64) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
            }
            stored = self.advance_checkpoint(stored).await;
        }
    }

    async fn advance_checkpoint(&self, stored: u64) -> u64 {
        // In this order: see `Ledger::checkpoint`.
        let synced = self.accounting.synced_len();
        let next = self.ledger.checkpoint(synced);
        if next <= stored {
            return stored;
        }
        match self.store_checkpoint(next).await {
            Ok(()) => next,
            Err(e) => {
                tracing::debug!(error = %e, "could not store the accounting checkpoint");
                stored
            }
        }
    }

    fn load_suspensions(&self) -> Result<(), EngineError> {
        let now = now_ms();
        for (key, value) in self.spool.states(SUSPEND_PREFIX)? {
            let Some(selector) = selector_from_key(&key) else {
                continue;
            };
            let until = state_u64(&value).unwrap_or(u64::MAX);
            if until > now {
                self.scheduler.suspend(&selector, until, now);
            }
        }
        Ok(())
    }

    /// Holds a domain or campaign (durably) until `duration` has passed, or until resumed.
    pub async fn suspend(
        &self,
        selector: &Selector,
        duration: Option<Duration>,
    ) -> Result<u64, EngineError> {
        let now = now_ms();
        let until = duration.map_or(u64::MAX, |d| now.saturating_add(d.as_millis() as u64));
        self.spool
            .put_state(&suspend_key(selector), until.to_be_bytes().to_vec())
            .await?;
        self.scheduler.suspend(selector, until, now);
        Ok(until)
    }

    /// Lifts a hold (and, for a destination, an automation backoff); returns whether there
    /// was one.
    pub async fn resume(&self, selector: &Selector) -> Result<bool, EngineError> {
        self.spool.delete_state(&suspend_key(selector)).await?;
        let held = self.scheduler.resume(selector, now_ms());
        let backed_off = match selector {
            Selector::Domain(name) => self.shaper.end_backoff(name),
            Selector::Campaign(_) => false,
        };
        Ok(held || backed_off)
    }

    /// Destinations (site, or `site|source`) whose automation backoff is in force.
    pub fn backing_off(&self) -> Vec<String> {
        self.shaper.backing_off()
    }

    /// Makes the selected deferred messages due now; returns how many.
    pub fn retry_now(&self, selector: &Selector) -> usize {
        self.scheduler.retry_now(selector, now_ms())
    }

    /// Removes the selected queued messages, each with an `AdminBounce` record; returns how
    /// many. Messages in flight finish their attempt first. The schedule gives the messages
    /// up in one pass; then, outside its lock, records are written and messages deleted a
    /// chunk at a time, each chunk one group of records and one spool write. If a chunk
    /// cannot be recorded, it and the rest go back on the schedule, untouched.
    pub async fn purge(&self, selector: &Selector) -> Result<usize, EngineError> {
        let ids = self.scheduler.take(selector);
        let mut purged = 0;
        for (i, chunk) in ids.chunks(PURGE_CHUNK).enumerate() {
            match self.purge_chunk(chunk).await {
                Ok(n) => purged += n,
                Err(e) => {
                    self.restore_ids(&ids[i * PURGE_CHUNK..]).await;
                    tracing::error!(error = %e, purged, "purge stopped; the rest stays queued");
                    return Err(e);
                }
            }
        }
        Ok(purged)
    }

    async fn purge_chunk(&self, ids: &[MessageId]) -> Result<usize, EngineError> {
        let metas = self.read_metas(ids.to_vec()).await?;
        let records = metas
            .iter()
            .map(|meta| {
                let mut r = self.record(RecordType::AdminBounce, meta);
                r.response = Some(Response {
                    code: 550,
                    enhanced_code: Some("5.0.0".into()),
                    text: "purged by the operator".into(),
                });
                r.bounce_category = Some(BounceCategory::Other);
                r
            })
            .collect();
        let count = metas.len();
        self.finalize_group(metas, records).await?;
        Ok(count)
    }

    /// Reads the metadata of `ids` on the blocking pool; ids no longer spooled are left out.
    async fn read_metas(&self, ids: Vec<MessageId>) -> Result<Vec<MessageMeta>, EngineError> {
        let spool = self.spool.clone();
        let read = tokio::task::spawn_blocking(move || {
            ids.iter()
                .filter_map(|id| spool.meta(id).transpose())
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| EngineError::Config(format!("spool reader failed: {e}")))?;
        Ok(read?)
    }

    /// Puts messages taken off the schedule back on it, as the spool has them.
    async fn restore_ids(&self, ids: &[MessageId]) {
        for chunk in ids.chunks(PURGE_CHUNK) {
            match self.read_metas(chunk.to_vec()).await {
                Ok(metas) => {
                    for meta in &metas {
                        self.enqueue_new(meta);
                    }
                }
                // Still in the spool: the next start queues them again.
                Err(e) => tracing::error!(error = %e, "could not requeue messages a purge left"),
            }
        }
    }

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
        let rates = config
            .keyed_rates()
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let policy = Arc::new(Policy::from_config(config)?);
        self.shaper.reload(rules);
        self.rates.reload(rates);
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy;
        tracing::info!("reloaded shaping, automation, TLS and rate rules and DKIM keys");
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Our host name: EHLO name of outbound sessions, banner of the SMTP listener.
    pub fn ehlo_name(&self) -> &str {
        &self.ehlo_name
    }

    /// Delivery workers running now (at most `delivery.max_workers`).
    pub fn workers_running(&self) -> usize {
        self.workers_running.load(Ordering::SeqCst)
    }

    /// The spool (for tools and tests that look below the API).
    pub fn spool(&self) -> &Spool {
        &self.spool
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

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
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

    /// DKIM-signs messages (`[[dkim]]`), stores them (synced), writes their `Reception`
    /// records and queues them. All or nothing: on error nothing was queued. A message that a
    /// key applies to but that cannot be signed fails the batch with
    /// [`EngineError::Unsignable`], which hands the batch back: sending it unsigned would
    /// fail DMARC at the receiver, and retrying the same bytes fails the same way.
    pub async fn accept(
        self: &Arc<Self>,
        messages: Vec<NewMessage>,
        via: &'static str,
    ) -> Result<(), EngineError> {
        if self.is_draining() {
            return Err(EngineError::Draining);
        }
        let queued = self.scheduler.len();
        if queued + messages.len() > self.config.spool.max_queued {
            return Err(EngineError::Full(queued));
        }
        let count = messages.len() as u64;
        let policy = self.policy();
        let (messages, signed) = if policy.signers.is_empty() {
            (messages, 0)
        } else {
            // RSA signing costs about a millisecond per message: a large batch would stall
            // the runtime's worker thread.
            let signing = tokio::task::spawn_blocking(move || sign_all(&policy.signers, messages))
                .await
                .map_err(|e| EngineError::Signing(e.to_string()))?;
            match signing {
                Ok(done) => done,
                Err(unsignable) => {
                    metrics::counter!(DKIM_SIGNATURES, "result" => "error")
                        .increment(unsignable.failures.len() as u64);
                    return Err(EngineError::Unsignable(unsignable));
                }
            }
        };
        let metas: Vec<MessageMeta> = messages.iter().map(|m| m.meta.clone()).collect();
        self.spool
            .insert(messages.into_iter().map(|m| (m.meta, m.body)).collect())
            .await?;
        metrics::counter!(RECEIVED, "via" => via).increment(count);
        metrics::counter!(DKIM_SIGNATURES, "result" => "signed").increment(signed);
        metrics::counter!(DKIM_SIGNATURES, "result" => "unsigned").increment(count - signed);
        // Accepted means spooled: the caller is answered now, and the Reception records are
        // synced in the background, each message queued only after its record is down, so a
        // Reception never follows its message's final record. A crash in that moment can lose
        // a Reception line, never a message or its final record.
        let engine = Arc::clone(self);
        self.workers.spawn(async move {
            let records = metas
                .iter()
                .map(|m| engine.record(RecordType::Reception, m))
                .collect();
            if let Err(e) = engine.accounting.record_all(records).await {
                // The messages are safely spooled and will be delivered; only the line is lost.
                tracing::error!(error = %e, "could not write Reception records");
            }
            for m in &metas {
                engine.enqueue_new(m);
            }
        });
        Ok(())
    }

    /// Puts a message back on the schedule under its queue (after an attempt): the domain,
    /// or `domain|source` when egress sources are configured (each source has its own
    /// sessions and limits).
    pub(crate) fn enqueue(&self, meta: &MessageMeta) {
        self.put_on_schedule(meta, false);
    }

    /// Queues a message just accepted or found by the spool reload, unless this process
    /// already has it in hand: the reload and the injection race for the messages accepted
    /// while it runs, and neither may re-queue one that is in flight or finished. Returns
    /// whether it was queued.
    fn enqueue_new(&self, meta: &MessageMeta) -> bool {
        self.put_on_schedule(meta, true)
    }

    fn put_on_schedule(&self, meta: &MessageMeta, only_new: bool) -> bool {
        let key = queue::queue_key(&meta.domain, self.egress.source_for(meta));
        let place = if only_new {
            Scheduler::restore
        } else {
            Scheduler::schedule
        };
        place(
            &self.scheduler,
            meta.id,
            &key,
            meta.campaign.as_deref(),
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
        r
    }

    /// Stops accepting, lets workers finish their current message (up to `grace`), closes
    /// sessions and the spool.
    pub async fn shutdown(&self, grace: Duration) {
        self.begin_drain();
        self.cancel.cancel();
        self.workers.close();
        if tokio::time::timeout(grace, self.workers.wait())
            .await
            .is_err()
        {
            tracing::warn!("workers still busy after {grace:?}; their messages stay spooled");
        }
        self.pool.close().await;
        // Finished messages need no look at the accounting file at the next start.
        self.advance_checkpoint(0).await;
        // Flushing the WAL waits for the disk: not on an async worker thread.
        let spool = self.spool.clone();
        match tokio::task::spawn_blocking(move || spool.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "spool flush at shutdown failed"),
            Err(e) => tracing::error!(error = %e, "spool flush at shutdown failed"),
        }
    }
}

/// Rules that can change while the engine runs.
#[derive(Debug)]
pub(crate) struct Policy {
    pub(crate) automation: Automation,
    /// `[[dkim]]` keys: reloaded with the rest, so a key rotation needs no restart.
    pub(crate) signers: dkim::Signers,
    shaping: Vec<ShapingConfig>,
}

impl Policy {
    fn from_config(config: &Config) -> Result<Policy, EngineError> {
        Ok(Policy {
            automation: Automation::from_config(config),
            signers: config
                .dkim_signers()
                .map_err(|e| EngineError::Config(e.to_string()))?,
            shaping: config.shaping.clone(),
        })
    }

    /// STARTTLS mode of a destination.
    pub(crate) fn tls_mode(&self, domain: &str, mx_hosts: &[String]) -> connection_pool::TlsMode {
        crate::config::tls_mode_of(&self.shaping, domain, mx_hosts)
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
