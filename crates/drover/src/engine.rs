//! The engine: owns the spool, the schedule, accounting and the delivery workers.
//!
//! Flow: injection stores a message (synced) and puts its id on the ready queue of its
//! destination; the dispatcher starts workers for destinations with ready messages, up to the
//! destination's connection cap; a worker holds one SMTP session and delivers that
//! destination's messages one after another, then parks the session in the pool.

use crate::config::Config;
use accounting::{classify, Accounting, BounceCategory, Peer, Record, RecordType, Response};
use connection_pool::{ClientError, ConnectOptions, Envelope, Pool, SmtpClient, Timeouts};
use queue::{Finalizing, MessageId, MessageMeta, Scheduler, Selector, Spool, SpoolOptions};
use rate_limiter::{DestinationLimiter, Limits, Shaper};
use resolver_cache::{Destination, MxResolver, ResolveError, ResolverSettings};
use smtp_proto::Reply;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const DELIVERY_DURATION: &str = "drover_delivery_duration_seconds";
const RECEIVED: &str = "drover_messages_received_total";

/// Registers the descriptions of every metric (contract §5).
pub fn describe_metrics() {
    metrics::describe_counter!(RECEIVED, "Messages accepted into the spool, by channel.");
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
}

/// Shared state of a running engine.
pub struct Engine {
    config: Config,
    spool: Spool,
    scheduler: Scheduler,
    accounting: Accounting,
    resolver: MxResolver,
    pool: Pool,
    shaper: Shaper,
    ehlo_name: String,
    timeouts: Timeouts,
    cancel: CancellationToken,
    workers: TaskTracker,
    draining: AtomicBool,
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

/// One message ready to be stored.
pub struct NewMessage {
    /// Metadata (id, envelope, campaign...).
    pub meta: MessageMeta,
    /// The RFC 5322 message.
    pub body: Vec<u8>,
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
        let ehlo_name = if config.delivery.ehlo_name.is_empty() {
            hostname()
        } else {
            config.delivery.ehlo_name.clone()
        };
        let command = config.delivery.command_timeout.0;
        let timeouts = Timeouts {
            connect: config.delivery.connect_timeout.0,
            banner: command,
            ehlo: command,
            mail: command,
            rcpt: command,
            data: command.min(Duration::from_secs(120)),
            data_block: command.min(Duration::from_secs(180)),
            final_dot: config.delivery.data_timeout.0,
            other: command.min(Duration::from_secs(120)),
        };
        let engine = Arc::new(Engine {
            pool: Pool::new(config.delivery.idle_timeout.0),
            config,
            spool,
            scheduler: Scheduler::new(),
            accounting,
            resolver,
            shaper,
            ehlo_name,
            timeouts,
            cancel: CancellationToken::new(),
            workers: TaskTracker::new(),
            draining: AtomicBool::new(false),
        });
        engine.load_suspensions()?;
        // The reload streams the spool while delivery already runs, so a large queue does
        // not delay the first delivery.
        let reloading = Arc::clone(&engine);
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = reloading.reload(&runtime) {
                tracing::error!(error = %e, "reloading the spool failed; some messages wait for the next start");
            }
        });
        tokio::spawn(Arc::clone(&engine).dispatch());
        tokio::spawn(Arc::clone(&engine).reap_idle_sessions());
        Ok(engine)
    }

    fn reload(&self, runtime: &tokio::runtime::Handle) -> Result<(), EngineError> {
        let mut count = 0u64;
        let mut unfinished = Vec::new();
        for meta in self.spool.scan() {
            if self.cancel.is_cancelled() {
                break;
            }
            let meta = match meta {
                Ok(meta) => meta,
                Err(e) => {
                    // One bad record must not keep every other message from being delivered.
                    tracing::error!(error = %e, "skipping an unreadable spool record");
                    continue;
                }
            };
            if meta.finalizing.is_some() {
                unfinished.push(meta);
                continue;
            }
            self.scheduler.schedule(
                meta.id,
                &meta.domain,
                meta.campaign.as_deref(),
                meta.due_ms,
                meta.received_ms,
                now_ms(),
            );
            count += 1;
        }
        if count > 0 {
            tracing::info!(messages = count, "reloaded the spool");
        }
        if !unfinished.is_empty() {
            runtime.block_on(self.complete_finalizations(unfinished))?;
        }
        Ok(())
    }

    /// Messages whose final records were being written when the engine stopped: write the
    /// records that did not reach the accounting file, then remove the messages.
    async fn complete_finalizations(&self, metas: Vec<MessageMeta>) -> Result<(), EngineError> {
        let offset = metas
            .iter()
            .filter_map(|m| m.finalizing.as_ref().map(|f| f.accounting_offset))
            .min()
            .unwrap_or(0);
        let path = self.accounting.path().to_owned();
        let written = accounting::final_ids_since(&path, offset).map_err(|source| {
            EngineError::Accounting(accounting::AccountingError::Io { path, source })
        })?;
        let mut completed = 0;
        for meta in metas {
            let Some(fin) = &meta.finalizing else {
                continue;
            };
            if !written.contains(&meta.id.to_string()) {
                self.accounting.record_lines(fin.records.clone()).await?;
                completed += 1;
            }
            self.spool.remove(meta.id, meta.due_ms).await?;
        }
        tracing::info!(
            completed,
            "finished final records interrupted by the last stop"
        );
        Ok(())
    }

    fn load_suspensions(&self) -> Result<(), EngineError> {
        let now = now_ms();
        for (key, value) in self.spool.states(SUSPEND_PREFIX)? {
            let Some(selector) = selector_from_key(&key) else {
                continue;
            };
            let until = value
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(u64::MAX, u64::from_be_bytes);
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

    /// Lifts a hold; returns whether there was one.
    pub async fn resume(&self, selector: &Selector) -> Result<bool, EngineError> {
        self.spool.delete_state(&suspend_key(selector)).await?;
        Ok(self.scheduler.resume(selector, now_ms()))
    }

    /// Makes the selected deferred messages due now; returns how many.
    pub fn retry_now(&self, selector: &Selector) -> usize {
        self.scheduler.retry_now(selector, now_ms())
    }

    /// Removes the selected queued messages, each with an `AdminBounce` record; returns how
    /// many. Messages in flight finish their attempt first.
    pub async fn purge(&self, selector: &Selector) -> Result<usize, EngineError> {
        let ids = self.scheduler.take(selector);
        let mut purged = 0;
        for id in ids {
            let Some(meta) = self.spool.meta(&id)? else {
                continue;
            };
            let mut r = self.record(RecordType::AdminBounce, &meta);
            r.response = Some(Response {
                code: 550,
                enhanced_code: Some("5.0.0".into()),
                text: "purged by the operator".into(),
            });
            r.bounce_category = Some(BounceCategory::Other);
            if self.finalize(meta, vec![r]).await {
                purged += 1;
            }
        }
        Ok(purged)
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Our host name: EHLO name of outbound sessions, banner of the SMTP listener.
    pub fn ehlo_name(&self) -> &str {
        &self.ehlo_name
    }

    /// The schedule (for the admin API).
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stores messages (synced), writes their `Reception` records and queues them.
    /// All or nothing: on error nothing was queued.
    pub async fn accept(
        &self,
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
        let metas: Vec<MessageMeta> = messages.iter().map(|m| m.meta.clone()).collect();
        self.spool
            .insert(messages.into_iter().map(|m| (m.meta, m.body)).collect())
            .await?;
        let records = metas
            .iter()
            .map(|m| self.record(RecordType::Reception, m))
            .collect();
        if let Err(e) = self.accounting.record_all(records).await {
            // The messages are safely spooled and will be delivered; only the log line is lost.
            tracing::error!(error = %e, "could not write Reception records");
        }
        metrics::counter!(RECEIVED, "via" => via).increment(count);
        let now = now_ms();
        for m in &metas {
            self.scheduler.schedule(
                m.id,
                &m.domain,
                m.campaign.as_deref(),
                m.due_ms,
                m.received_ms,
                now,
            );
        }
        Ok(())
    }

    fn record(&self, kind: RecordType, meta: &MessageMeta) -> Record {
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

    async fn dispatch(self: Arc<Self>) {
        loop {
            let now = now_ms();
            self.scheduler.promote(now);
            for (destination, ready) in self.scheduler.ready_destinations(now) {
                let limiter = self.shaper.limiter(&destination, &destination, &[]);
                // Open another session only when the ones running have a backlog: a session
                // carries many messages, and receivers count connections.
                while ready > limiter.connections_in_use() * 4 {
                    let Some(slot) = limiter.try_connection_slot() else {
                        break;
                    };
                    let engine = Arc::clone(&self);
                    let limiter = Arc::clone(&limiter);
                    let destination = destination.clone();
                    self.workers.spawn(async move {
                        engine.work(&destination, &limiter).await;
                        drop(slot);
                        engine.scheduler.wake();
                    });
                }
            }
            let sleep = match self.scheduler.next_due() {
                Some(due) => Duration::from_millis(due.saturating_sub(now_ms()).clamp(1, 1000)),
                None => Duration::from_secs(1),
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.scheduler.changed() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    async fn reap_idle_sessions(self: Arc<Self>) {
        let period = (self.config.delivery.idle_timeout.0 / 2).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(period) => self.pool.reap(),
            }
        }
    }

    /// A delivery worker: one session, many messages of one destination.
    async fn work(&self, destination: &str, limiter: &DestinationLimiter) {
        let mut session: Option<SmtpClient> = None;
        let max_per_session = limiter.limits().max_deliveries_per_connection;
        while !self.cancel.is_cancelled() {
            let Some(id) = self.scheduler.pop_ready(destination, now_ms()) else {
                break;
            };
            limiter.until_message_permitted().await;
            if session
                .as_ref()
                .is_some_and(|s| !s.is_usable() || s.transactions() >= max_per_session)
            {
                if let Some(old) = session.take() {
                    old.quit().await;
                }
            }
            match self.attempt(id, destination, limiter, &mut session).await {
                Some(meta) => self.scheduler.schedule(
                    meta.id,
                    &meta.domain,
                    meta.campaign.as_deref(),
                    meta.due_ms,
                    meta.received_ms,
                    now_ms(),
                ),
                None => self.scheduler.finish(id),
            }
        }
        if let Some(s) = session {
            if s.is_usable() && s.transactions() < max_per_session {
                self.pool.checkin(destination, s);
            } else {
                s.quit().await;
            }
        }
    }

    async fn attempt(
        &self,
        id: MessageId,
        destination: &str,
        limiter: &DestinationLimiter,
        session: &mut Option<SmtpClient>,
    ) -> Option<MessageMeta> {
        let (mut meta, body) = match (self.spool.meta(&id), self.spool.body(&id)) {
            (Ok(Some(meta)), Ok(Some(body))) => (meta, body),
            // Purged while it waited.
            (Ok(None), _) | (_, Ok(None)) => return None,
            (Err(e), _) | (_, Err(e)) => {
                // Left in the spool: the next start retries it.
                tracing::error!(%id, error = %e, "cannot read message from the spool");
                return None;
            }
        };
        meta.attempts += 1;
        let dest = match self.resolver.resolve(&meta.domain).await {
            Ok(dest) => dest,
            Err(e) => {
                let permanent = e.is_permanent();
                let code = if permanent { 550 } else { 451 };
                let response = Response {
                    code,
                    enhanced_code: Some(e.enhanced_code().to_owned()),
                    text: e.to_string(),
                };
                let category = if permanent {
                    BounceCategory::BadDomain
                } else {
                    BounceCategory::RoutingErrors
                };
                return self
                    .conclude(
                        meta,
                        destination,
                        Outcome::synthetic(response, category, permanent),
                    )
                    .await;
            }
        };
        let envelope = Envelope {
            sender: meta.sender.clone(),
            recipients: vec![meta.recipient.clone()],
        };
        // A pooled session may have been closed by the server while idle; that costs the
        // message nothing: one more try on a fresh session.
        for fresh_try in [false, true] {
            let reused = if session.is_none() {
                *session = self.pool.checkout(destination);
                session.is_some()
            } else {
                true
            };
            if session.is_none() {
                limiter.until_connection_permitted().await;
                match self.connect(&meta.domain, &dest).await {
                    Ok(client) => *session = Some(client),
                    Err(e) => {
                        let response = Response {
                            code: 451,
                            enhanced_code: Some("4.4.1".into()),
                            text: format!("no MX host of {} answered: {e}", meta.domain),
                        };
                        return self
                            .conclude(
                                meta,
                                &dest.site,
                                Outcome::synthetic(
                                    response,
                                    BounceCategory::NoAnswerFromHost,
                                    false,
                                ),
                            )
                            .await;
                    }
                }
            }
            let client = session.as_mut()?;
            let started = std::time::Instant::now();
            let result = client.send(&envelope, &body).await;
            metrics::histogram!(DELIVERY_DURATION).record(started.elapsed().as_secs_f64());
            let peer = Peer {
                host: client.peer().host.clone(),
                address: client.peer().address.to_string(),
            };
            let source = client.peer().local.map(|a| a.ip().to_string());
            let tls = client.tls().map(|t| t.to_string());
            match result {
                Ok(tx) => {
                    let reply = tx.outcome_for(0).clone();
                    let mut outcome = Outcome::from_reply(&reply);
                    outcome.peer = Some(peer);
                    outcome.source = source;
                    outcome.tls = tls;
                    return self.conclude(meta, &dest.site, outcome).await;
                }
                Err(e) => {
                    *session = None;
                    if reused && !fresh_try && !e.after_final_dot() {
                        continue;
                    }
                    // The session broke (timeout, reset, garbage): not the message's fault,
                    // so it is deferred, never bounced.
                    let mut outcome = Outcome::synthetic(
                        Response {
                            code: 451,
                            enhanced_code: Some("4.4.2".into()),
                            text: e.to_string(),
                        },
                        BounceCategory::NoAnswerFromHost,
                        false,
                    );
                    outcome.peer = Some(peer);
                    outcome.source = source;
                    return self.conclude(meta, &dest.site, outcome).await;
                }
            }
        }
        None
    }

    /// Connects to the destination's hosts in order: next address, then next host.
    async fn connect(&self, domain: &str, dest: &Destination) -> Result<SmtpClient, ClientError> {
        let mx_hosts: Vec<String> = dest.hosts.iter().map(|h| h.name.clone()).collect();
        let tls = self.config.tls_mode(domain, &mx_hosts);
        let mut last = None;
        for host in &dest.hosts {
            for address in &host.addresses {
                let mut options = ConnectOptions::new(&host.name, *address, &self.ehlo_name);
                options.timeouts = self.timeouts;
                options.tls = tls;
                match SmtpClient::connect_with(options).await {
                    Ok(client) => return Ok(client),
                    Err(e) => {
                        tracing::debug!(host = %host.name, %address, error = %e, "connect failed");
                        last = Some(e);
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Connect {
            address: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no addresses"),
        }))
    }

    /// Writes the record an attempt earned and moves the message on: removed when final,
    /// expired, or returned with its next due time for the caller to schedule.
    async fn conclude(
        &self,
        mut meta: MessageMeta,
        site: &str,
        outcome: Outcome,
    ) -> Option<MessageMeta> {
        let now = now_ms();
        let kind = match outcome.verdict {
            Verdict::Delivered => RecordType::Delivery,
            Verdict::Bounced => RecordType::Bounce,
            Verdict::Deferred => RecordType::TransientFailure,
        };
        let mut record = self.record(kind, &meta);
        record.site = Some(site.to_owned());
        record.peer = outcome.peer.clone();
        record.source = outcome.source.clone();
        record.tls = outcome.tls.clone();
        record.response = Some(outcome.response.clone());
        if kind != RecordType::Delivery {
            record.bounce_category = Some(outcome.category);
        }
        if kind.is_final() {
            self.finalize(meta, vec![record]).await;
            return None;
        }
        let delay = self.retry_delay(&meta, outcome.category);
        let age = now.saturating_sub(meta.received_ms);
        let max_age = self.config.retry.max_age.0.as_millis() as u64;
        if age >= max_age {
            let mut expired = self.record(RecordType::Expiration, &meta);
            expired.site = Some(site.to_owned());
            expired.response = Some(outcome.response);
            expired.bounce_category = Some(BounceCategory::MessageExpired);
            self.finalize(meta, vec![record, expired]).await;
            return None;
        }
        let previous_due = meta.due_ms;
        // The last retry happens at max_age, so a message gets its full lifetime.
        meta.due_ms = (now + delay.as_millis() as u64).min(meta.received_ms + max_age);
        if let Some(source) = &outcome.source {
            meta.last_source = Some(source.clone());
        }
        if let Err(e) = self.accounting.record(record).await {
            tracing::error!(id = %meta.id, error = %e, "could not write TransientFailure record");
        }
        if let Err(e) = self.spool.update(meta.clone(), previous_due).await {
            // The old schedule entry is still on disk: after a restart the message is retried.
            tracing::error!(id = %meta.id, error = %e, "could not reschedule in the spool");
        }
        Some(meta)
    }

    /// Ends a message's life: its final records on disk, then the message out of the spool,
    /// with a synced marker in between steps so a crash can neither lose the records nor
    /// write them twice (see [`queue::Finalizing`]). Returns whether the message is gone.
    async fn finalize(&self, mut meta: MessageMeta, records: Vec<Record>) -> bool {
        meta.finalizing = Some(Finalizing {
            accounting_offset: self.accounting.synced_len(),
            records: records.iter().map(Accounting::to_line).collect(),
        });
        if let Err(e) = self.spool.update(meta.clone(), meta.due_ms).await {
            // Nothing was recorded; the message stays and is tried again after a restart.
            tracing::error!(id = %meta.id, error = %e, "cannot mark a message final");
            return false;
        }
        if let Err(e) = self.accounting.record_all(records).await {
            // The marker holds the records: the next start writes them.
            tracing::error!(id = %meta.id, error = %e, "could not write the final record");
            return false;
        }
        if let Err(e) = self.spool.remove(meta.id, meta.due_ms).await {
            tracing::error!(id = %meta.id, error = %e, "could not remove a finished message");
        }
        true
    }

    fn retry_delay(&self, meta: &MessageMeta, category: BounceCategory) -> Duration {
        let retry = &self.config.retry;
        let base = if category == BounceCategory::Greylisted && meta.attempts <= 1 {
            retry.greylist_retry.0
        } else {
            let i = (meta.attempts.saturating_sub(1) as usize)
                .min(retry.intervals.len().saturating_sub(1));
            retry
                .intervals
                .get(i)
                .map_or(Duration::from_secs(300), |d| d.0)
        };
        // Up to 10 % jitter spreads retries of a large batch over time instead of a spike.
        let jitter = base.mul_f64(rand::random::<f64>() * 0.1);
        base + jitter
    }

    /// Stops accepting, lets workers finish their current message (up to `grace`), closes
    /// sessions and the spool.
    pub async fn shutdown(&self, grace: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        self.cancel.cancel();
        self.workers.close();
        if tokio::time::timeout(grace, self.workers.wait())
            .await
            .is_err()
        {
            tracing::warn!("workers still busy after {grace:?}; their messages stay spooled");
        }
        self.pool.close().await;
        if let Err(e) = self.spool.close() {
            tracing::error!(error = %e, "spool flush at shutdown failed");
        }
    }
}

enum Verdict {
    Delivered,
    Deferred,
    Bounced,
}

struct Outcome {
    verdict: Verdict,
    response: Response,
    category: BounceCategory,
    peer: Option<Peer>,
    source: Option<String>,
    tls: Option<String>,
}

impl Outcome {
    fn from_reply(reply: &Reply) -> Outcome {
        let enhanced = reply.enhanced.map(|e| e.to_string());
        let text = reply.text();
        let verdict = if reply.is_positive() {
            Verdict::Delivered
        } else if reply.is_permanent() {
            Verdict::Bounced
        } else {
            Verdict::Deferred
        };
        Outcome {
            category: classify(reply.code, enhanced.as_deref(), &text),
            verdict,
            response: Response {
                code: reply.code,
                enhanced_code: enhanced,
                text,
            },
            peer: None,
            source: None,
            tls: None,
        }
    }

    fn synthetic(response: Response, category: BounceCategory, permanent: bool) -> Outcome {
        Outcome {
            verdict: if permanent {
                Verdict::Bounced
            } else {
                Verdict::Deferred
            },
            response,
            category,
            peer: None,
            source: None,
            tls: None,
        }
    }
}
