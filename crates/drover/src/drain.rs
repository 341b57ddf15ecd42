//! Scale-down: moving queued messages to a peer engine (`drover drain`, KumoMTA's xfer,
//! `[drain] on_shutdown_to`), and taking them in on the peer's side.
//!
//! The sender takes messages off its schedule a chunk at a time (so no worker can start them),
//! posts them in batches to the peer's `POST /api/admin/v1/transfer` with their metadata and
//! their spooled bytes, and only after the peer's 2xx (the peer has synced them) writes a
//! `Transfer` record for each and deletes them, through the finalizer like any final record.
//! The peer takes a message it already has, or had (the spool's `sent` index remembers every
//! message inserted for `bounce_processing.sent_retention`), as done without a second copy, so
//! a batch sent again after a crash on either side lands once. The job is kept in the spool's
//! state, so a restarted engine carries on where it stopped.
//!
//! A drain of everything (no filter) is a scale-down: the engine refuses new mail (`/readyz`
//! says not ready), starts no deliveries, and waits for the attempts in flight; their messages
//! that come back to the schedule go too. A filtered drain (KumoMTA's xfer of a domain) moves
//! what is queued and leaves the rest of the engine alone.

use crate::clock::now_ms;
use crate::engine::{Engine, EngineError};
use crate::telemetry::{DRAIN_LEFT, DRAIN_MESSAGES};
use accounting::{RecordType, Response, TransferInfo};
use base64::Engine as _;
use queue::{Filter, MessageId, MessageMeta};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The spool state key of the running drain ([`DrainSpec`] as JSON).
const JOB_KEY: &str = "drain/job";
/// Messages taken off the schedule at a time.
const TAKE_CHUNK: usize = 2_000;
/// Messages per request to the peer.
const BATCH_MESSAGES: usize = 200;
/// Body bytes per request to the peer (at least one message goes, whatever its size; the
/// peer's `http.max_body_size` must hold its base64 form).
const BATCH_BYTES: u64 = 8 << 20;
/// How long one request to the peer may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait between attempts while the peer cannot be reached.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What a drain moves and where to; kept in the spool so a restarted engine carries on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainSpec {
    /// The peer's base URL (`http://peer:8025`).
    pub to: String,
    /// The bearer token the peer's API wants, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Which messages; every message when empty.
    #[serde(default)]
    pub filter: Filter,
    /// Why, written into each `Transfer` record.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl DrainSpec {
    fn endpoint(&self) -> String {
        format!("{}/api/admin/v1/transfer", self.to.trim_end_matches('/'))
    }
}

/// Where a drain stands (`GET /api/admin/v1/drain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DrainStatus {
    /// `idle` (none since start), `running`, `done` or `failed`.
    pub state: &'static str,
    /// The peer's base URL.
    pub to: Option<String>,
    /// Which messages (every one when empty).
    #[serde(flatten)]
    pub filter: Filter,
    /// Messages moved so far by this process.
    pub moved: u64,
    /// Messages still to move (queued or in flight here and selected).
    pub left: u64,
    /// Why the last attempt failed (retried), or why the drain stopped (`failed`).
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    Done,
    Failed,
}

#[derive(Debug)]
struct Job {
    spec: DrainSpec,
    moved: AtomicU64,
    left: AtomicU64,
    state: Mutex<(State, Option<String>)>,
    cancel: CancellationToken,
}

impl Job {
    fn new(spec: DrainSpec) -> Arc<Job> {
        Arc::new(Job {
            spec,
            moved: AtomicU64::new(0),
            left: AtomicU64::new(0),
            state: Mutex::new((State::Running, None)),
            cancel: CancellationToken::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (State, Option<String>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> State {
        self.lock().0
    }

    fn set(&self, state: State, error: Option<String>) {
        *self.lock() = (state, error);
    }

    fn failed_attempt(&self, why: String) {
        self.lock().1 = Some(why);
    }

    fn set_left(&self, left: usize) {
        self.left.store(left as u64, Ordering::Relaxed);
        metrics::gauge!(DRAIN_LEFT).set(left as f64);
    }

    /// Whether it moves everything: the engine is being scaled down.
    fn is_full(&self) -> bool {
        self.spec.filter.is_all()
    }
}

/// The engine's drains: the one going out (one at a time) and the lock that takes transfers
/// in one request at a time.
#[derive(Debug, Default)]
pub(crate) struct Drains {
    current: Mutex<Option<Arc<Job>>>,
    /// Two copies of a batch (a retry after a timeout while the first is still being written)
    /// must not both pass the "already here?" check.
    incoming: tokio::sync::Mutex<()>,
    /// Injections between their intake check and the queueing of their messages (which
    /// follows the answer): a drain is not over while one may still queue what it selects.
    accepting: Arc<AtomicUsize>,
    /// One start at a time: two concurrent starts must not both find no drain running.
    starting: tokio::sync::Mutex<()>,
    /// This process's own name in transfers: a drain to itself would find every message
    /// "already here" and delete it.
    instance: OnceLock<String>,
}

/// An injection in progress (see [`Drains::accepting`]); ends when dropped.
#[derive(Debug)]
pub(crate) struct Accepting(Arc<AtomicUsize>);

impl Drop for Accepting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drains {
    /// An injection begins; keep the guard until its messages are queued.
    pub(crate) fn accepting(&self) -> Accepting {
        self.accepting.fetch_add(1, Ordering::SeqCst);
        Accepting(Arc::clone(&self.accepting))
    }

    fn instance(&self) -> &str {
        self.instance
            .get_or_init(|| uuid::Uuid::now_v7().simple().to_string())
    }

    /// Whether an injection may still queue messages.
    fn injections_pending(&self) -> bool {
        self.accepting.load(Ordering::SeqCst) > 0
    }

    fn current(&self) -> Option<Arc<Job>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Makes `job` the current drain; the one it replaces (finished, or one that finished and
    /// still watches for stragglers) stops.
    fn replace(&self, job: Option<Arc<Job>>) {
        let old = std::mem::replace(
            &mut *self.current.lock().unwrap_or_else(|p| p.into_inner()),
            job,
        );
        if let Some(old) = old {
            old.cancel.cancel();
        }
    }

    /// Whether a drain of everything is running or has finished: the engine takes no new mail
    /// and starts no deliveries (a failed one lets both go on).
    pub(crate) fn scaling_down(&self) -> bool {
        self.current()
            .is_some_and(|j| j.is_full() && j.state() != State::Failed)
    }
}

/// `POST /api/admin/v1/transfer`: messages from another instance.
#[derive(Debug, Serialize, Deserialize)]
pub struct TransferRequest {
    /// The sending instance (its EHLO name), for the `Reception` records.
    #[serde(default)]
    pub from: Option<String>,
    /// The sending process's random id: an engine refuses its own messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The messages, each with its metadata.
    pub messages: Vec<TransferMessage>,
}

/// One message of a transfer: its metadata as the sender spooled it, and its bytes.
#[derive(Debug, Serialize, Deserialize)]
pub struct TransferMessage {
    /// Id, envelope, campaign, tenant, reception and due time, attempts, headers, metadata.
    #[serde(flatten)]
    pub meta: MessageMeta,
    /// The spooled message (signed, stamped), base64.
    pub body: String,
}

/// The reply to a transfer: how many messages are new here and how many were here already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferReply {
    /// Stored (synced) and queued by this request.
    pub received: usize,
    /// Already here, or delivered from here, before: acknowledged without a second copy.
    pub already: usize,
}

/// Why a chunk of a drain stopped.
enum Stop {
    /// The job or the engine is stopping.
    Cancelled,
    /// Worth trying again after a pause (peer unreachable, 5xx, a storage error).
    Transient(String),
    /// The peer refuses what we send (a bad token, no such endpoint): trying again cannot help.
    Refused(String),
}

impl Engine {
    /// Starts draining to `spec.to` (or reports the drain already running with the same
    /// target and filter). [`EngineError::Busy`] when another drain runs.
    pub async fn start_drain(
        self: &Arc<Self>,
        spec: DrainSpec,
    ) -> Result<DrainStatus, EngineError> {
        crate::config::peer_url(&spec.to).map_err(EngineError::Refused)?;
        let _one_at_a_time = self.drains.starting.lock().await;
        if let Some(job) = self.drains.current() {
            if job.state() == State::Running {
                if job.spec.to == spec.to && job.spec.filter == spec.filter {
                    return Ok(self.drain_status());
                }
                return Err(EngineError::Busy(format!(
                    "a drain to {} is running; wait for it or cancel it first",
                    job.spec.to
                )));
            }
        }
        let job = Job::new(spec);
        // Nothing selected (a filtered drain of what is not queued here): done at once.
        if !job.is_full()
            && !self.is_reloading()
            && !self.drains.injections_pending()
            && self.scheduler.count_filtered(&job.spec.filter) == 0
        {
            job.set(State::Done, None);
            self.drains.replace(Some(job));
            return Ok(self.drain_status());
        }
        let stored = serde_json::to_vec(&job.spec)
            .map_err(|e| EngineError::Refused(format!("drain: {e}")))?;
        self.spool.put_state(JOB_KEY, stored).await?;
        tracing::info!(to = %job.spec.to, filter = ?job.spec.filter, "drain started");
        self.run_job(job);
        Ok(self.drain_status())
    }

    /// Carries on a drain an earlier process left unfinished (at start, before the
    /// listeners open: a scale-down refuses mail from the first moment).
    pub(crate) fn resume_drain(self: &Arc<Self>) -> Result<(), EngineError> {
        let Some(stored) = self.spool.state(JOB_KEY)? else {
            return Ok(());
        };
        match serde_json::from_slice::<DrainSpec>(&stored) {
            Ok(spec) => {
                tracing::info!(to = %spec.to, filter = ?spec.filter, "resuming the drain the last run left unfinished");
                self.run_job(Job::new(spec));
            }
            Err(e) => tracing::error!(error = %e, "ignoring an unreadable stored drain"),
        }
        Ok(())
    }

    fn run_job(self: &Arc<Self>, job: Arc<Job>) {
        self.drains.replace(Some(Arc::clone(&job)));
        let engine = Arc::clone(self);
        tokio::spawn(async move { engine.drain(job).await });
    }

    /// Where the drain stands.
    pub fn drain_status(&self) -> DrainStatus {
        match self.drains.current() {
            None => DrainStatus {
                state: "idle",
                to: None,
                filter: Filter::default(),
                moved: 0,
                left: 0,
                last_error: None,
            },
            Some(job) => {
                let (state, last_error) = job.lock().clone();
                DrainStatus {
                    state: match state {
                        State::Running => "running",
                        State::Done => "done",
                        State::Failed => "failed",
                    },
                    to: Some(job.spec.to.clone()),
                    filter: job.spec.filter.clone(),
                    moved: job.moved.load(Ordering::Relaxed),
                    left: job.left.load(Ordering::Relaxed),
                    last_error,
                }
            }
        }
    }

    /// Stops the drain (messages not moved yet stay here and are delivered from here) and
    /// forgets it; an engine that was scaling down takes mail again. Returns whether one
    /// was running.
    pub async fn cancel_drain(&self) -> Result<bool, EngineError> {
        let Some(job) = self.drains.current() else {
            return Ok(false);
        };
        self.spool.delete_state(JOB_KEY).await?;
        job.cancel.cancel();
        let was = job.state() == State::Running;
        self.drains.replace(None);
        metrics::gauge!(DRAIN_LEFT).set(0.0);
        self.scheduler.wake();
        Ok(was)
    }

    /// At SIGTERM with `[drain] on_shutdown_to`: drains every queued message to `to` (with
    /// `[drain] peer_token_file`) and waits until done. Returns whether everything moved.
    pub async fn drain_on_shutdown(self: &Arc<Self>, to: &str) -> Result<bool, EngineError> {
        let token = self
            .config
            .drain
            .peer_token()
            .map_err(|e| EngineError::Config(e.to_string()))?;
        let spec = DrainSpec {
            to: to.to_owned(),
            token,
            filter: Filter::default(),
            reason: "shutdown".into(),
        };
        tracing::info!(%to, "SIGTERM: draining the queue before stopping");
        self.start_drain(spec).await?;
        Ok(self.wait_drained().await)
    }

    /// Waits until the running drain (if any) has ended; returns whether it moved everything.
    pub async fn wait_drained(&self) -> bool {
        loop {
            match self.drains.current().map(|j| j.state()) {
                None | Some(State::Failed) => return false,
                Some(State::Done) => return true,
                Some(State::Running) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn drain(self: Arc<Self>, job: Arc<Job>) {
        // The start-up reload marks what it has not read yet as unknown: a message taken
        // now could not be put back on the schedule.
        while self.is_reloading() {
            if !self.drain_pause(&job, Duration::from_millis(50)).await {
                return;
            }
        }
        let client = match reqwest::Client::builder().timeout(PEER_TIMEOUT).build() {
            Ok(c) => c,
            Err(e) => {
                return self
                    .end_drain(&job, Some(format!("HTTP client: {e}")))
                    .await
            }
        };
        let filter = job.spec.filter.clone();
        let mut backoff = Duration::from_millis(250);
        loop {
            if job.cancel.is_cancelled() || self.cancel.is_cancelled() {
                return;
            }
            let ids = self.scheduler.take_filtered(&filter, TAKE_CHUNK);
            job.set_left(ids.len() + self.scheduler.count_filtered(&filter));
            if ids.is_empty() {
                // An injection answered just before may not have queued its messages yet.
                if !job.is_full() && !self.drains.injections_pending() {
                    return self.end_drain(&job, None).await;
                }
                // A scale-down waits for the attempts in flight (what they leave queued
                // comes back to the schedule and goes too) and for the expansion of stored
                // inject requests (deferred generation).
                if !self.scheduler.is_empty()
                    || self.drains.injections_pending()
                    || self.generations_pending() > 0
                {
                    if !self.drain_pause(&job, Duration::from_millis(100)).await {
                        return;
                    }
                    continue;
                }
                self.end_drain(&job, None).await;
                // Done, but it keeps watching: an injection that passed the intake check
                // just before the drain began may queue its messages only now.
                while self.scheduler.is_empty()
                    && !self.drains.injections_pending()
                    && self.generations_pending() == 0
                {
                    if !self.drain_pause(&job, Duration::from_millis(200)).await {
                        return;
                    }
                }
                job.set(State::Running, None);
                continue;
            }
            match self.move_chunk(&job, &client, ids).await {
                Ok(()) => backoff = Duration::from_millis(250),
                Err(Stop::Cancelled) => return,
                Err(Stop::Refused(why)) => return self.end_drain(&job, Some(why)).await,
                Err(Stop::Transient(why)) => {
                    tracing::warn!(to = %job.spec.to, error = %why, "drain: retrying");
                    job.failed_attempt(why);
                    if !self.drain_pause(&job, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Sleeps `d`; false if the job or the engine stops meanwhile.
    async fn drain_pause(&self, job: &Job, d: Duration) -> bool {
        tokio::select! {
            _ = job.cancel.cancelled() => false,
            _ = self.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// The drain is over: done (`why` none) or refused by the peer.
    async fn end_drain(&self, job: &Job, why: Option<String>) {
        if let Err(e) = self.spool.delete_state(JOB_KEY).await {
            tracing::warn!(error = %e, "could not forget the finished drain; the next start checks again");
        }
        match &why {
            None => {
                tracing::info!(to = %job.spec.to, moved = job.moved.load(Ordering::Relaxed), "drain done");
                job.set(State::Done, None);
            }
            Some(why) => {
                tracing::error!(to = %job.spec.to, error = %why, "drain stopped; the rest stays here");
                job.set(State::Failed, Some(why.clone()));
            }
        }
        job.set_left(if why.is_some() {
            self.scheduler.count_filtered(&job.spec.filter)
        } else {
            0
        });
        self.scheduler.wake();
    }

    /// Moves the messages `ids` (taken off the schedule) in batches; on an error, the ones not
    /// moved go back on the schedule.
    async fn move_chunk(
        &self,
        job: &Job,
        client: &reqwest::Client,
        ids: Vec<MessageId>,
    ) -> Result<(), Stop> {
        let metas = loop {
            match self.read_metas(ids.clone()).await {
                Ok(metas) => break metas,
                // Off the schedule and not readable: they stay spooled, and only reading
                // them lets them go back, so wait for the spool.
                Err(e) => {
                    tracing::warn!(error = %e, "drain: cannot read the spool; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return Err(Stop::Cancelled),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        let mut rest = metas.as_slice();
        while !rest.is_empty() {
            let mut n = 0;
            let mut bytes = 0;
            while n < rest.len()
                && n < BATCH_MESSAGES
                && (n == 0 || bytes + rest[n].size <= BATCH_BYTES)
            {
                bytes += rest[n].size;
                n += 1;
            }
            let (batch, after) = rest.split_at(n);
            let stop = if job.cancel.is_cancelled() || self.cancel.is_cancelled() {
                Some(Stop::Cancelled)
            } else {
                self.move_batch(job, client, batch).await.err()
            };
            if let Some(stop) = stop {
                for meta in rest {
                    self.enqueue(meta);
                }
                return Err(stop);
            }
            rest = after;
        }
        Ok(())
    }

    /// Sends one batch; after the peer's 2xx, records `Transfer` for each and deletes them.
    async fn move_batch(
        &self,
        job: &Job,
        client: &reqwest::Client,
        metas: &[MessageMeta],
    ) -> Result<(), Stop> {
        let spool = self.spool.clone();
        let wanted: Vec<MessageId> = metas.iter().map(|m| m.id).collect();
        let bodies = tokio::task::spawn_blocking(move || {
            wanted
                .iter()
                .map(|id| spool.body(id))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| Stop::Transient(format!("spool reader: {e}")))?
        .map_err(|e| Stop::Transient(format!("reading the spool: {e}")))?;
        let mut sent = Vec::with_capacity(metas.len());
        let mut messages = Vec::with_capacity(metas.len());
        for (meta, body) in metas.iter().zip(bodies) {
            // No body: a message this engine cannot send anywhere either; it stays for
            // the next start to report.
            let Some(body) = body else {
                tracing::error!(id = %meta.id, "drain: a spooled message has no body; left here");
                continue;
            };
            sent.push(meta.clone());
            messages.push(TransferMessage {
                meta: meta.clone(),
                body: base64::engine::general_purpose::STANDARD.encode(&body),
            });
        }
        if messages.is_empty() {
            return Ok(());
        }
        let request = TransferRequest {
            from: Some(self.ehlo_name().to_owned()),
            instance: Some(self.drains.instance().to_owned()),
            messages,
        };
        let mut post = client.post(job.spec.endpoint()).json(&request);
        if let Some(token) = &job.spec.token {
            post = post.bearer_auth(token);
        }
        let response = post
            .send()
            .await
            .map_err(|e| Stop::Transient(format!("{}: {e}", job.spec.to)))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            let why = format!("{} answered {status}: {}", job.spec.to, text.trim());
            return Err(
                if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    Stop::Transient(why)
                } else {
                    Stop::Refused(why)
                },
            );
        }
        let reply: TransferReply = response
            .json()
            .await
            .map_err(|e| Stop::Transient(format!("{}: unreadable reply: {e}", job.spec.to)))?;
        if reply.received + reply.already != sent.len() {
            return Err(Stop::Refused(format!(
                "{} acknowledged {} of {} messages",
                job.spec.to,
                reply.received + reply.already,
                sent.len()
            )));
        }
        let text = if job.spec.reason.is_empty() {
            format!("transferred to {}", job.spec.to)
        } else {
            format!("transferred to {}: {}", job.spec.to, job.spec.reason)
        };
        let records = sent
            .iter()
            .map(|meta| {
                let mut r = self.record(RecordType::Transfer, meta);
                r.response = Some(Response {
                    code: 250,
                    enhanced_code: Some("2.0.0".into()),
                    text: text.clone(),
                });
                r.transfer = Some(TransferInfo {
                    from: None,
                    to: Some(job.spec.to.clone()),
                });
                r
            })
            .collect();
        // The peer has them now; if this record cannot be written they go back on the
        // schedule here, and the next attempt finds them at the peer already.
        self.finalizer
            .finalize_group(&sent, records)
            .await
            .map_err(|e| Stop::Transient(format!("recording the transfer: {e}")))?;
        job.moved.fetch_add(sent.len() as u64, Ordering::Relaxed);
        metrics::counter!(DRAIN_MESSAGES, "direction" => "out").increment(sent.len() as u64);
        Ok(())
    }

    /// Takes in messages from another instance: each new one is stored (synced) as it was
    /// spooled there, its `Reception` written, and queued at its due time with its attempts;
    /// one this engine has, or had, is acknowledged without a second copy.
    pub async fn take_transfer(
        self: &Arc<Self>,
        request: TransferRequest,
    ) -> Result<TransferReply, EngineError> {
        if request.instance.as_deref() == Some(self.drains.instance()) {
            return Err(EngineError::Refused(
                "this is the draining engine itself: drain to another one".into(),
            ));
        }
        if self.is_draining() {
            return Err(EngineError::Draining);
        }
        let mut incoming = Vec::with_capacity(request.messages.len());
        for (i, m) in request.messages.into_iter().enumerate() {
            let body = base64::engine::general_purpose::STANDARD
                .decode(m.body.as_bytes())
                .map_err(|e| EngineError::Refused(format!("messages[{i}].body: {e}")))?;
            if m.meta.recipient.is_empty() || m.meta.domain.is_empty() || body.is_empty() {
                return Err(EngineError::Refused(format!(
                    "messages[{i}]: recipient, domain and body are required"
                )));
            }
            incoming.push((m.meta, body));
        }
        let _one_at_a_time = self.drains.incoming.lock().await;
        let spool = self.spool.clone();
        let ids: Vec<MessageId> = incoming.iter().map(|(m, _)| m.id).collect();
        let known = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|id| Ok(spool.meta(id)?.is_some() || spool.sent(id)?.is_some()))
                .collect::<Result<Vec<bool>, queue::QueueError>>()
        })
        .await
        .map_err(|e| EngineError::Config(format!("spool reader failed: {e}")))??;
        let total = incoming.len();
        let mut fresh: Vec<(MessageMeta, Vec<u8>)> = incoming
            .into_iter()
            .zip(known)
            .filter_map(|(m, known)| (!known).then_some(m))
            .collect();
        let already = total - fresh.len();
        if fresh.is_empty() {
            return Ok(TransferReply {
                received: 0,
                already,
            });
        }
        let queued = self.scheduler.len();
        if queued + fresh.len() > self.config.spool.max_queued {
            return Err(EngineError::Full(queued));
        }
        // As at injection: the checkpoint stays behind until the Reception records are down,
        // and the arrival time, taken after the hold, lets a restart find a lost one.
        let hold = self.finalizer.hold();
        let arrived = now_ms();
        for (meta, body) in &mut fresh {
            meta.size = body.len() as u64;
            meta.arrived_ms = Some(arrived);
            // Egress source names are this instance's own.
            meta.last_source = None;
        }
        let metas: Vec<MessageMeta> = fresh.iter().map(|(m, _)| m.clone()).collect();
        if let Err(e) = self.spool.insert(fresh).await {
            self.finalizer.release(hold);
            return Err(e.into());
        }
        let records = metas
            .iter()
            .map(|m| {
                let mut r = self.record(RecordType::Reception, m);
                r.transfer = Some(TransferInfo {
                    from: request.from.clone(),
                    to: None,
                });
                r
            })
            .collect();
        // Answered only once the records are down: a sender that gets no 2xx sends again,
        // and finds the messages here already. On failure the hold stays, and the next
        // start writes them; the messages are queued either way (as at injection).
        let recorded = self.accounting.record_all(records).await;
        if recorded.is_ok() {
            self.finalizer.release(hold);
        }
        for m in &metas {
            self.enqueue_new(m);
        }
        recorded?;
        metrics::counter!(DRAIN_MESSAGES, "direction" => "in").increment(metas.len() as u64);
        Ok(TransferReply {
            received: metas.len(),
            already,
        })
    }
}
