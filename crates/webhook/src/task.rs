//! The task of one webhook: read, filter, batch, POST until acknowledged, store the cursor.

use crate::backoff::Backoff;
use crate::batch::{self, Filter, Held, Verdict};
use crate::metrics_names::{Meters, Outcome};
use crate::status::{Progress, Shared, WebhookHandle};
use crate::{CursorStore, Position, Source, SourceRecord, WebhookConfig, WebhookError};
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::{Client, Url};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// With nothing held and nothing new, the source is asked again this often, so the backlog
/// and the gauges stay fresh.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// Progress over filtered-out records only is stored at most this often: a busy log that a
/// webhook mostly ignores must not turn into a store per read.
const STORE_INTERVAL: Duration = Duration::from_secs(1);
/// The gauges are refreshed at least this often while a batch waits between retries.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);
/// A response body is read (so the connection can be reused) up to this size; past it the
/// connection is dropped instead.
const BODY_DRAIN_LIMIT: usize = 64 * 1024;
/// How much of an error response's body goes into the error message.
const ERROR_SNIPPET: usize = 200;

static WEBHOOK_HEADER: HeaderName = HeaderName::from_static("x-drover-webhook");
static BATCH_ID_HEADER: HeaderName = HeaderName::from_static("x-drover-batch-id");
static SIGNATURE_HEADER: HeaderName = HeaderName::from_static("x-drover-signature");

/// Starts webhook `config` reading `source` (made to start at `start`, the stored cursor),
/// storing its cursor in `store`, until `cancel` fires. Checks the configuration first, and
/// needs a Tokio runtime.
pub fn spawn<S: Source, C: CursorStore>(
    config: WebhookConfig,
    source: S,
    store: Arc<C>,
    start: Position,
    cancel: CancellationToken,
) -> Result<WebhookHandle, WebhookError> {
    config.validate()?;
    let url = config.parsed_url()?;
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| WebhookError::NoRuntime)?;
    let name = config.label();
    let client = client(&config, &name)?;
    let shared = Arc::new(Shared {
        name: name.clone(),
        url: config.display_url(),
        progress: Mutex::new(Progress::new(start)),
    });
    let done = CancellationToken::new();
    let worker = Worker {
        filter: Filter::new(&config.types, &config.tenants),
        signing_key: (!config.secret.is_empty()).then(|| config.secret.clone()),
        batch_size: config.batch_size,
        max_delay: config.max_delay,
        max_backoff: config.max_backoff,
        meters: Meters::new(&name),
        name,
        url,
        client,
        source,
        store,
        cancel,
        shared: shared.clone(),
        stored: start,
        consumed: start,
        last_store: Instant::now(),
        held: Vec::new(),
        held_bytes: 0,
    };
    // Fires when the task ends in any way (returned, panicked, or dropped with the runtime).
    let ended = done.clone().drop_guard();
    runtime.spawn(async move {
        let _ended = ended;
        worker.run().await;
    });
    Ok(WebhookHandle { shared, done })
}

fn client(config: &WebhookConfig, name: &str) -> Result<Client, WebhookError> {
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let name = HeaderValue::from_str(name).map_err(|e| WebhookError::Invalid {
        key: "name",
        message: e.to_string(),
    })?;
    headers.insert(WEBHOOK_HEADER.clone(), name);
    Client::builder()
        .user_agent(concat!("drover/", env!("CARGO_PKG_VERSION")))
        .default_headers(headers)
        // Receivers written against the documented header names may compare them verbatim.
        .http1_title_case_headers()
        .timeout(config.timeout)
        .connect_timeout(config.timeout)
        // A moved endpoint is a configuration change to make, not something to follow
        // silently (and a 301/302 would turn the POST into a GET).
        .redirect(reqwest::redirect::Policy::none())
        .danger_accept_invalid_certs(!config.tls_verify)
        .build()
        .map_err(|e| WebhookError::Client(error_chain(&e)))
}

/// The task ended because its token fired.
struct Cancelled;

/// Why a request did not count as delivered.
struct Failure {
    outcome: Outcome,
    message: String,
}

struct Worker<S, C> {
    name: String,
    url: Url,
    filter: Filter,
    signing_key: Option<String>,
    batch_size: usize,
    max_delay: Duration,
    max_backoff: Duration,
    client: Client,
    meters: Meters,
    source: S,
    store: Arc<C>,
    cancel: CancellationToken,
    shared: Arc<Shared>,
    /// The cursor last stored.
    stored: Position,
    /// The end of the last record taken from the source (sent, held or filtered out).
    consumed: Position,
    last_store: Instant,
    /// The batch: records taken and chosen, not yet acknowledged.
    held: Vec<Held>,
    held_bytes: u64,
}

impl<S: Source, C: CursorStore> Worker<S, C> {
    async fn run(mut self) {
        tracing::info!(webhook = %self.name, url = %self.shared.url, cursor = %self.stored, "webhook started");
        while self.round().await.is_ok() {}
        tracing::info!(webhook = %self.name, cursor = %self.stored, "webhook stopped");
    }

    /// One batch: gathered, delivered, its cursor stored.
    async fn round(&mut self) -> Result<(), Cancelled> {
        self.fill().await?;
        self.deliver().await?;
        let count = self.held.len() as u64;
        self.meters.records.increment(count);
        self.held.clear();
        self.held_bytes = 0;
        {
            let mut p = self.shared.progress();
            p.sent_records += count;
            p.consecutive_failures = 0;
            p.last_success = Some(OffsetDateTime::now_utc());
        }
        self.refresh();
        // Every record consumed so far is either in the acknowledged batch or filtered out.
        self.persist(self.consumed).await
    }

    /// Reads until a batch is full, or non-empty and `max_delay` old.
    async fn fill(&mut self) -> Result<(), Cancelled> {
        let mut deadline: Option<Instant> = None;
        let mut errors = Backoff::new(self.max_backoff);
        loop {
            let now = Instant::now();
            if self.held.len() >= self.batch_size || deadline.is_some_and(|d| now >= d) {
                return Ok(());
            }
            let wait = match deadline {
                Some(d) => d - now,
                None if self.consumed != self.stored => {
                    let due = self.last_store + STORE_INTERVAL;
                    if now >= due {
                        self.persist(self.consumed).await?;
                        continue;
                    }
                    (due - now).min(IDLE_WAIT)
                }
                None => IDLE_WAIT,
            };
            let max = self.batch_size - self.held.len();
            let read = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(Cancelled),
                read = self.source.next_batch(max, wait) => read,
            };
            match read {
                Ok(records) => {
                    errors = Backoff::new(self.max_backoff);
                    for record in records {
                        self.take(record);
                    }
                    if deadline.is_none() && !self.held.is_empty() {
                        deadline = Some(Instant::now() + self.max_delay);
                    }
                    self.refresh();
                }
                Err(e) => {
                    tracing::warn!(webhook = %self.name, error = %e, "cannot read the accounting log");
                    self.shared.progress().last_error = Some(format!("reading the log: {e}"));
                    self.pause(errors.next()).await?;
                }
            }
        }
    }

    fn take(&mut self, record: SourceRecord) {
        self.consumed = record.end;
        match self.filter.judge(&record.line) {
            Verdict::Send(timestamp) => {
                self.held_bytes += record.line.len() as u64 + 1;
                self.held.push(Held { record, timestamp });
            }
            Verdict::Skip => {}
            Verdict::Unparsable(error) => {
                tracing::warn!(webhook = %self.name, end = %record.end, %error, "skipping a line of the accounting log that is not a record");
                self.meters.unparsable.increment(1);
            }
        }
    }

    /// POSTs the held batch until the endpoint answers 2xx.
    async fn deliver(&mut self) -> Result<(), Cancelled> {
        let Some(first) = self.held.first() else {
            return Ok(());
        };
        let id = HeaderValue::from_str(&batch::batch_id(&first.record))
            .unwrap_or_else(|_| unreachable!("digits and a dash are a valid header value"));
        let body = batch::body(&self.held);
        let signature = self.signing_key.as_ref().map(|key| {
            HeaderValue::from_str(&batch::signature(key, &body))
                .unwrap_or_else(|_| unreachable!("hex is a valid header value"))
        });
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            let started = Instant::now();
            let attempt = post(
                &self.client,
                &self.url,
                &id,
                signature.as_ref(),
                body.clone(),
            );
            let result = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(Cancelled),
                result = attempt => result,
            };
            self.meters.duration.record(started.elapsed().as_secs_f64());
            match result {
                Ok(()) => {
                    self.meters.request(Outcome::Ok).increment(1);
                    return Ok(());
                }
                Err(failure) => {
                    self.meters.request(failure.outcome).increment(1);
                    let failures = {
                        let mut p = self.shared.progress();
                        p.consecutive_failures = p.consecutive_failures.saturating_add(1);
                        p.last_error = Some(failure.message.clone());
                        p.consecutive_failures
                    };
                    let delay = backoff.next();
                    tracing::warn!(
                        webhook = %self.name,
                        batch = ?id,
                        records = self.held.len(),
                        failures,
                        retry_in = ?delay,
                        error = %failure.message,
                        "webhook request failed"
                    );
                    self.pause(delay).await?;
                }
            }
        }
    }

    /// Stores `cursor`, retrying until it is stored.
    async fn persist(&mut self, cursor: Position) -> Result<(), Cancelled> {
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            let stored = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(Cancelled),
                stored = self.store.store(&self.name, cursor) => stored,
            };
            match stored {
                Ok(()) => {
                    self.stored = cursor;
                    self.last_store = Instant::now();
                    self.shared.progress().cursor = cursor;
                    return Ok(());
                }
                Err(e) => {
                    let delay = backoff.next();
                    tracing::warn!(webhook = %self.name, %cursor, error = %e, retry_in = ?delay, "cannot store the webhook cursor");
                    self.shared.progress().last_error = Some(format!("storing the cursor: {e}"));
                    self.pause(delay).await?;
                }
            }
        }
    }

    /// Sleeps `delay` (or until cancelled), keeping the gauges fresh meanwhile.
    async fn pause(&mut self, delay: Duration) -> Result<(), Cancelled> {
        let until = Instant::now() + delay;
        loop {
            self.refresh();
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            let step = (until - now).min(GAUGE_INTERVAL);
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(Cancelled),
                _ = tokio::time::sleep(step) => {}
            }
        }
    }

    /// Publishes what is held and what the log still has, to the status and the gauges.
    fn refresh(&self) {
        let backlog = self.source.backlog();
        let now = OffsetDateTime::now_utc();
        let (records, bytes, seconds) = {
            let mut p = self.shared.progress();
            p.held_records = self.held.len() as u64;
            p.held_bytes = self.held_bytes;
            p.backlog_records = backlog.records;
            p.backlog_bytes = backlog.bytes;
            p.oldest_held = self.held.first().map(|h| h.timestamp);
            (p.lag_records(), p.lag_bytes(), p.lag_seconds(now))
        };
        self.meters.lag_records.set(records as f64);
        self.meters.lag_bytes.set(bytes as f64);
        self.meters.lag_seconds.set(seconds);
    }
}

/// One attempt: a 2xx is delivered, anything else a failure.
async fn post(
    client: &Client,
    url: &Url,
    id: &HeaderValue,
    signature: Option<&HeaderValue>,
    body: Bytes,
) -> Result<(), Failure> {
    let mut request = client
        .post(url.clone())
        .header(BATCH_ID_HEADER.clone(), id.clone());
    if let Some(signature) = signature {
        request = request.header(SIGNATURE_HEADER.clone(), signature.clone());
    }
    let mut response = request.body(body).send().await.map_err(transport)?;
    let status = response.status();
    // Reading the answer to its end lets the connection serve the next batch.
    let mut snippet = Vec::new();
    let mut read = 0usize;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                read += chunk.len();
                if snippet.len() < ERROR_SNIPPET {
                    let room = ERROR_SNIPPET - snippet.len();
                    snippet.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                if read > BODY_DRAIN_LIMIT {
                    break;
                }
            }
            Ok(None) => break,
            // The status is what counts: a 2xx whose body broke off was still accepted.
            Err(e) if status.is_success() => {
                tracing::debug!(error = %error_chain(&e), "webhook response body broke off");
                break;
            }
            Err(e) => return Err(transport(e)),
        }
    }
    if status.is_success() {
        return Ok(());
    }
    let mut message = format!("HTTP {status}");
    if let Some(location) = response.headers().get(reqwest::header::LOCATION) {
        message.push_str(&format!(
            " (redirects to {}: update the url)",
            String::from_utf8_lossy(location.as_bytes())
        ));
    }
    let text = String::from_utf8_lossy(&snippet);
    let text = text.trim();
    if !text.is_empty() {
        message.push_str(": ");
        message.push_str(text);
    }
    Err(Failure {
        outcome: Outcome::HttpError,
        message,
    })
}

fn transport(e: reqwest::Error) -> Failure {
    let outcome = if e.is_timeout() {
        Outcome::Timeout
    } else {
        Outcome::ConnectError
    };
    Failure {
        outcome,
        message: error_chain(&e.without_url()),
    }
}

/// The error and its causes on one line (reqwest's own message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
