//! The durable spool (RocksDB) and the in-memory schedule of queued messages.
//!
//! # On-disk layout
//!
//! One RocksDB database under `spool.path`, three column families:
//!
//! | column family | key | value |
//! | --- | --- | --- |
//! | `meta` | message id (16 bytes, UUIDv7: time-ordered) | [`MessageMeta`] as JSON |
//! | `body` | message id | the RFC 5322 message, CRLF line endings |
//! | `schedule` | due time (u64 ms since the epoch, big-endian) ++ message id | empty |
//! | `state` | UTF-8 key, e.g. `suspend/domain/<name>` | engine state (operator holds), JSON |
//! | `generation` | `r` ++ request id / `p` ++ request id | a stored inject request (deferred generation), opaque / the index of its next recipient (u64, big-endian) |
//!
//! Invariants:
//! - A message exists iff its `meta` key exists; `body` and `schedule` entries are written and
//!   deleted in the same `WriteBatch` as `meta`.
//! - `schedule` holds exactly one key per message, the one of its current `due_ms`, so a range
//!   scan up to "now" yields what is due.
//! - An insert is synced to the WAL before its caller is answered. Reschedules and removals
//!   may be written unsynced (`*_lazily`) where losing them only repeats an attempt or is
//!   covered by the accounting checkpoint below; the spool writes in order, so any later
//!   synced write makes them durable. Writes from concurrent callers are group-committed: one
//!   sync for all of them, written as `WriteBatch`es of at most about 8 MiB (one caller's
//!   writes are never split, so each caller's writes stay all-or-nothing).
//! - A start-up reload (which reads the spool while the engine already injects and delivers)
//!   never queues a message this process already has in hand: [`Scheduler::restore`] skips
//!   ids that are queued, in flight, or finished since [`Scheduler::begin_reload`]. Without
//!   that, a message read by the scan before its delivery ended would be delivered twice.
//! - A message is removed only after its final accounting record is synced (the engine's rule;
//!   see `drover::finals`): the record is appended (synced), then the message is deleted
//!   (unsynced). The `state` key `accounting/checkpoint` holds an accounting offset before
//!   which every final record's message is durably deleted; at start the engine deletes the
//!   spooled messages that have a final record after it instead of delivering them again.
//! - A stored inject request's progress marker moves in the same `WriteBatch` as the messages
//!   made for the recipients it passes, so each recipient's message is stored exactly once
//!   however often the expansion is cut short ([`Spool::insert_generated`]).
//! - A failed write (full disk) leaves nothing applied and makes the spool read-only until it
//!   can be reopened; see the `spool` module for the recovery (`Spool::is_writable`).

mod fair;
mod message;
#[cfg(test)]
mod model_check;
mod schedule;
mod spool;
mod suppression;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use fair::Priority;
pub use message::{MessageId, MessageMeta};
pub use schedule::{DestinationCounts, Filter, GroupCounts, Scheduler, Selector, Tags};
pub use spool::{
    free_bytes, Spool, SpoolOptions, DEFAULT_BODY_BUFFER_BYTES, DEFAULT_MEMORY_BUDGET_BYTES,
    DEFAULT_PENDING_WRITE_BYTES, FSYNC_HISTOGRAM, MAX_REOPEN_BACKOFF, REOPEN_HEADROOM,
    WRITE_HISTOGRAM,
};
pub use suppression::{Sent, Suppression, SuppressionKey};

/// Errors of the spool.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// RocksDB failed (I/O error, full disk, corruption).
    #[error("spool storage error: {0}")]
    Storage(#[from] rocksdb::Error),
    /// A group-committed write failed (e.g. the disk is full); nothing of it was applied.
    #[error("spool write failed: {0}")]
    Write(String),
    /// A stored record could not be decoded.
    #[error("corrupt spool record for {id}: {reason}")]
    Corrupt {
        /// The key's message id, as hex.
        id: String,
        /// What was wrong.
        reason: String,
    },
    /// The spool refuses writes since an earlier storage error (e.g. a full disk) and has not
    /// been reopened yet; nothing of this write was applied. It recovers by itself.
    #[error(
        "the spool is read-only after a storage error ({0}); writes resume when it can be reopened"
    )]
    Unwritable(String),
    /// The writer thread is gone (the spool is shutting down).
    #[error("the spool is closed")]
    Closed,
    /// A message id string did not parse.
    #[error("invalid message id {0:?}")]
    BadId(String),
    /// The writer is reopening the database after a storage error: reads fail fast instead of
    /// waiting for the WAL replay; retry shortly.
    #[error("the spool is being reopened; retry shortly")]
    Reopening,
}

impl QueueError {
    /// Whether the same read or write may succeed if tried again later (storage errors,
    /// a reopen, a degraded spool), as opposed to a record that will never decode.
    pub fn is_transient(&self) -> bool {
        !matches!(self, QueueError::Corrupt { .. } | QueueError::BadId(_))
    }
}

/// Registers the descriptions of the metrics this crate records.
pub fn describe_metrics() {
    metrics::describe_gauge!(
        schedule::QUEUE_GAUGE,
        "Messages in the queue, by state (scheduled, ready, in_flight)."
    );
    metrics::describe_histogram!(
        spool::WRITE_HISTOGRAM,
        metrics::Unit::Seconds,
        "Time to write one group commit of the spool (write-ahead log and memtables)."
    );
    metrics::describe_histogram!(
        spool::FSYNC_HISTOGRAM,
        metrics::Unit::Seconds,
        "Time to sync the spool's write-ahead log after a group commit that needs it."
    );
    metrics::describe_gauge!(
        spool::WRITABLE_GAUGE,
        "1 while the spool accepts writes, 0 while it is read-only after a storage error."
    );
}
