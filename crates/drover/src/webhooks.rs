//! Records out by webhook: one sender (crate `webhook`) per `[[webhook]]`, following the
//! accounting log from a cursor kept in the spool. The senders only read the log: a slow or
//! dead endpoint never holds up delivery, and what it has not taken stays on disk (within
//! `accounting.webhook_hold`, see `log_keeper`).

use crate::engine::Engine;
use accounting::{Accounting, AccountingError, Position, Reader};
use queue::Spool;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use webhook::{Backlog, CursorStore, SourceRecord, WebhookHandle, WebhookStatus};

/// Records counted ahead per count for the lag figure (bounds the work one count adds).
const COUNT_AHEAD: u64 = 100_000;
/// How often the backlog is counted (the lag gauges are this stale at most).
const COUNT_INTERVAL: Duration = Duration::from_secs(1);
/// Once a record is there, how long a read waits for more to fill the batch: the log grows
/// a group commit at a time, and a read per group commit would cost more than it sends.
const COALESCE: Duration = Duration::from_millis(100);

/// The running senders.
#[derive(Debug, Default)]
pub(crate) struct Webhooks {
    handles: Mutex<Vec<WebhookHandle>>,
}

impl Webhooks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<WebhookHandle>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where each sender stands, how far behind it is, and its last error.
    pub(crate) fn statuses(&self) -> Vec<WebhookStatus> {
        self.lock().iter().map(WebhookHandle::status).collect()
    }

    /// The cursor of the sender furthest behind: the log after it is still owed.
    pub(crate) fn slowest_cursor(&self) -> Option<Position> {
        self.lock().iter().map(|h| h.status().cursor).min()
    }
}

fn cursor_key(name: &str) -> String {
    format!("webhook/{name}/cursor")
}

/// Cursors in the spool's state column family (synced writes).
struct SpoolCursors(Spool);

impl CursorStore for SpoolCursors {
    async fn store(&self, name: &str, cursor: Position) -> Result<(), String> {
        self.0
            .put_state(&cursor_key(name), cursor.to_bytes().to_vec())
            .await
            .map_err(|e| e.to_string())
    }
}

/// The accounting log as a sender reads it: whole synced records, in order, with a second
/// reader running ahead to count what is still to come.
struct LogSource {
    name: String,
    reader: Option<Reader>,
    counter: Option<Reader>,
    /// Records between `reader` and `counter`.
    ahead: u64,
    backlog_bytes: u64,
    last_count: Option<tokio::time::Instant>,
}

impl LogSource {
    /// Runs `f` on a reader on the blocking pool (the reads are file I/O).
    async fn on_blocking<T: Send + 'static>(
        slot: &mut Option<Reader>,
        f: impl FnOnce(&mut Reader) -> T + Send + 'static,
    ) -> Result<T, String> {
        let mut reader = slot.take().ok_or("the log reader was lost")?;
        let (reader, out) = tokio::task::spawn_blocking(move || {
            let out = f(&mut reader);
            (reader, out)
        })
        .await
        .map_err(|e| e.to_string())?;
        *slot = Some(reader);
        Ok(out)
    }

    /// Reads up to `max` records, going past a segment that went missing (with an error:
    /// those records cannot be sent).
    async fn read(&mut self, max: usize) -> Result<Vec<accounting::Line>, String> {
        let name = self.name.clone();
        Self::on_blocking(&mut self.reader, move |reader| loop {
            match reader.read(max) {
                Err(AccountingError::MissingSegment { segment, expected }) => {
                    tracing::error!(
                        webhook = %name,
                        segment,
                        expected = %expected.display(),
                        "an accounting segment this webhook had not sent is gone; its records are skipped"
                    );
                    metrics::counter!(crate::telemetry::WEBHOOK_SKIPPED_SEGMENTS, "webhook" => name.clone()).increment(1);
                    reader.skip_segment();
                }
                other => return other.map_err(|e| e.to_string()),
            }
        })
        .await?
    }

    async fn count_ahead(&mut self) {
        let (Some(reader), Some(counter)) = (&self.reader, &self.counter) else {
            return;
        };
        if counter.position() < reader.position() {
            // The sender overtook the count (a backlog larger than one count's worth): start
            // counting again from where it stands.
            let at = reader.position();
            self.counter = Some(reader.fork(at));
            self.ahead = 0;
        }
        let counted = Self::on_blocking(&mut self.counter, |counter| loop {
            match counter.skip(COUNT_AHEAD) {
                Ok(n) => return (n, counter.backlog_bytes()),
                Err(AccountingError::MissingSegment { .. }) => counter.skip_segment(),
                Err(_) => return (0, counter.backlog_bytes()),
            }
        })
        .await;
        if let Ok((n, _)) = counted {
            self.ahead += n;
        }
        if let Some(reader) = &self.reader {
            self.backlog_bytes = reader.backlog_bytes();
        }
    }
}

impl webhook::Source for LogSource {
    async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<SourceRecord>, String> {
        let mut lines = self.read(max).await?;
        if lines.is_empty() {
            if let Some(reader) = self.reader.as_mut() {
                reader.wait(wait).await;
            }
            lines = self.read(max).await?;
        }
        if !lines.is_empty() && lines.len() < max {
            let until = tokio::time::Instant::now() + COALESCE.min(wait);
            while lines.len() < max {
                let now = tokio::time::Instant::now();
                if now >= until {
                    break;
                }
                if let Some(reader) = self.reader.as_mut() {
                    reader.wait(until - now).await;
                }
                let more = self.read(max - lines.len()).await?;
                lines.extend(more);
            }
        }
        self.ahead = self.ahead.saturating_sub(lines.len() as u64);
        if self
            .last_count
            .is_none_or(|t| t.elapsed() >= COUNT_INTERVAL)
        {
            self.last_count = Some(tokio::time::Instant::now());
            self.count_ahead().await;
        }
        Ok(lines
            .into_iter()
            .map(|l| SourceRecord {
                end: l.end,
                line: l.text,
            })
            .collect())
    }

    fn backlog(&self) -> Backlog {
        Backlog {
            records: self.ahead,
            bytes: self.backlog_bytes,
        }
    }
}

impl Engine {
    /// Starts a sender per `[[webhook]]`, each from its stored cursor; a webhook configured
    /// for the first time starts at the end of the log (it is sent what happens from now on,
    /// not the history).
    pub(crate) async fn start_webhooks(&self) -> Result<(), crate::error::EngineError> {
        for config in &self.config.webhook {
            let name = config.label();
            let key = cursor_key(&name);
            let start = match self
                .spool
                .state(&key)?
                .and_then(|v| Position::from_bytes(&v))
            {
                Some(cursor) => cursor,
                None => {
                    let end = self.accounting.synced_position();
                    self.spool.put_state(&key, end.to_bytes().to_vec()).await?;
                    end
                }
            };
            let source = log_source(&self.accounting, &name, start);
            let handle = webhook::spawn(
                config.clone(),
                source,
                Arc::new(SpoolCursors(self.spool.clone())),
                start,
                self.cancel.child_token(),
            )
            .map_err(|e| crate::error::EngineError::Config(format!("webhook {name}: {e}")))?;
            tracing::info!(webhook = %name, cursor = %start, "webhook sender started");
            self.webhooks.lock().push(handle);
        }
        Ok(())
    }
}

fn log_source(accounting: &Accounting, name: &str, start: Position) -> LogSource {
    LogSource {
        name: name.to_owned(),
        reader: Some(accounting.reader(start)),
        counter: Some(accounting.reader(start)),
        ahead: 0,
        backlog_bytes: 0,
        last_count: None,
    }
}
