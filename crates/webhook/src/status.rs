//! What a running webhook reports, and the handle that reads it.

use accounting::Position;
use serde::Serialize;
use std::sync::{Arc, Mutex, PoisonError};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// A snapshot of one webhook, for the admin API and `drover status`.
#[derive(Serialize, Clone, Debug)]
pub struct WebhookStatus {
    /// The label ([`crate::WebhookConfig::label`]).
    pub name: String,
    /// The endpoint (a password in it replaced by `redacted`).
    pub url: String,
    /// The stored cursor: the log position after the last acknowledged record.
    pub cursor: Position,
    /// Records not yet acknowledged: those held for sending plus the log after them.
    pub lag_records: u64,
    /// Their bytes in the log.
    pub lag_bytes: u64,
    /// Age of the oldest record read but not yet acknowledged; 0 when caught up.
    pub lag_seconds: f64,
    /// Records acknowledged since the webhook started.
    pub sent_records: u64,
    /// Failed requests since the last success (0: the endpoint answers).
    pub consecutive_failures: u32,
    /// The most recent failure (of a request, of the log or of storing the cursor), kept after
    /// a success so the last problem stays visible.
    pub last_error: Option<String>,
    /// When the endpoint last answered 2xx (RFC 3339).
    pub last_success: Option<String>,
}

/// The mutable half of the status, written by the task.
#[derive(Debug)]
pub(crate) struct Progress {
    pub(crate) cursor: Position,
    /// Records and bytes held in memory, not yet acknowledged.
    pub(crate) held_records: u64,
    pub(crate) held_bytes: u64,
    /// The source's backlog as last read.
    pub(crate) backlog_records: u64,
    pub(crate) backlog_bytes: u64,
    /// Timestamp of the oldest held record.
    pub(crate) oldest_held: Option<OffsetDateTime>,
    pub(crate) sent_records: u64,
    pub(crate) consecutive_failures: u32,
    pub(crate) last_error: Option<String>,
    pub(crate) last_success: Option<OffsetDateTime>,
}

impl Progress {
    pub(crate) fn new(cursor: Position) -> Progress {
        Progress {
            cursor,
            held_records: 0,
            held_bytes: 0,
            backlog_records: 0,
            backlog_bytes: 0,
            oldest_held: None,
            sent_records: 0,
            consecutive_failures: 0,
            last_error: None,
            last_success: None,
        }
    }

    pub(crate) fn lag_records(&self) -> u64 {
        self.held_records.saturating_add(self.backlog_records)
    }

    pub(crate) fn lag_bytes(&self) -> u64 {
        self.held_bytes.saturating_add(self.backlog_bytes)
    }

    pub(crate) fn lag_seconds(&self, now: OffsetDateTime) -> f64 {
        self.oldest_held
            .map_or(0.0, |t| (now - t).as_seconds_f64().max(0.0))
    }
}

/// What the task and the handles share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) progress: Mutex<Progress>,
}

impl Shared {
    /// The progress; a panic elsewhere while it was held leaves numbers that are still worth
    /// reading, so a poisoned lock is used as it is.
    pub(crate) fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running webhook: its status, and the end of its task.
#[derive(Clone, Debug)]
pub struct WebhookHandle {
    pub(crate) shared: Arc<Shared>,
    /// Cancelled when the task ends, however it ends.
    pub(crate) done: CancellationToken,
}

impl WebhookHandle {
    /// The webhook's state now.
    pub fn status(&self) -> WebhookStatus {
        let p = self.shared.progress();
        WebhookStatus {
            name: self.shared.name.clone(),
            url: self.shared.url.clone(),
            cursor: p.cursor,
            lag_records: p.lag_records(),
            lag_bytes: p.lag_bytes(),
            lag_seconds: p.lag_seconds(OffsetDateTime::now_utc()),
            sent_records: p.sent_records,
            consecutive_failures: p.consecutive_failures,
            last_error: p.last_error.clone(),
            last_success: p.last_success.and_then(|t| t.format(&Rfc3339).ok()),
        }
    }

    /// Ends when the task has ended (after the cancellation token given to
    /// [`crate::spawn`] fired).
    pub async fn join(self) {
        self.done.cancelled().await
    }

    /// Whether the task has ended.
    pub fn is_finished(&self) -> bool {
        self.done.is_cancelled()
    }
}
