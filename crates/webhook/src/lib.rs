//! Webhooks: the accounting records (contract §4), POSTed to HTTP endpoints as JSON arrays.
//!
//! Platforms that send through Drover want its events pushed to them, not scraped from a file.
//! Each `[[webhook]]` ([`WebhookConfig`]) runs one task ([`spawn`]) that reads the log through a
//! [`Source`], keeps the records its `types` and `tenants` select, and POSTs them in batches of
//! up to `batch_size` (a partial batch after `max_delay`). The body is the log's own lines joined
//! into an array, not a re-serialisation, so the receiver sees exactly what was recorded.
//!
//! # Guarantees
//!
//! - **At least once, in log order.** A batch stays in memory until the endpoint answers 2xx;
//!   any error, timeout or other status is retried with the same body, with backoff (1 s
//!   doubling to `max_backoff`, jittered), and nothing after it is sent meanwhile.
//! - **A durable cursor that never runs ahead.** Only after a 2xx is the position after the
//!   batch's last consumed record stored through the [`CursorStore`], and a failed store is
//!   retried before anything else is sent. A restart from the stored cursor therefore resends
//!   at most the batch that was in flight (or acknowledged but not yet stored).
//! - **Duplicates can be recognised.** `X-Drover-Batch-Id` is the position of the batch's first
//!   record: the same for every retry of a batch, across restarts too, so a receiver can drop a
//!   batch it already has. With a secret, `X-Drover-Signature: sha256=<hex>` is the
//!   HMAC-SHA256 of the exact body.
//! - **Prompt shutdown.** Cancelling the token ends the task at once, mid-request or
//!   mid-backoff included; the cursor may then be behind, never ahead.
//!
//! Each webhook has one HTTP client, so sequential batches reuse one kept-alive connection.
//! TLS is rustls (*ring*) with the bundled public roots plus the system's; redirects are not
//! followed (a 3xx is a failure naming the new location); `HTTPS_PROXY` and friends apply.

mod backoff;
mod batch;
mod config;
mod metrics_names;
mod status;
mod task;

pub use accounting::Position;
pub use config::WebhookConfig;
pub use metrics_names::describe_metrics;
pub use status::{WebhookHandle, WebhookStatus};
pub use task::spawn;

use std::future::Future;
use std::time::Duration;

/// Everything that can go wrong when starting a webhook; once running, failures are retried
/// and reported in [`WebhookStatus`], never returned.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A key of the configuration makes no sense.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, e.g. `url` or `types`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The HTTP client could not be built (e.g. the system's certificate store is unreadable).
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    /// [`spawn`] was called outside a Tokio runtime.
    #[error("webhooks run on a Tokio runtime, and none is running here")]
    NoRuntime,
}

/// One line of the accounting log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRecord {
    /// The position just after the record (and its newline).
    pub end: Position,
    /// The record's JSON object exactly as in the log, without the newline.
    pub line: String,
}

/// How much of the log is still to be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Records after the last one returned.
    pub records: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The accounting log, read forward from a position.
pub trait Source: Send + 'static {
    /// The records after the last one returned (the first call: after the position the
    /// source was made with), at most `max`; waits up to `wait` for the first one and returns
    /// an empty Vec if none came. An error is retried (with backoff) by the caller.
    fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<SourceRecord>, String>> + Send;

    /// What is in the log after the last returned record.
    fn backlog(&self) -> Backlog;
}

/// Where the webhooks' cursors are kept.
pub trait CursorStore: Send + Sync + 'static {
    /// Durably stores `cursor` for webhook `name` (the position after the last acknowledged
    /// record).
    fn store(
        &self,
        name: &str,
        cursor: Position,
    ) -> impl Future<Output = Result<(), String>> + Send;
}
