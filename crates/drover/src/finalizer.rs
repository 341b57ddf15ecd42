//! Exactly one final record per message, without a spool write per message to promise it.
//!
//! A message ends with two writes: its final record appended to the accounting log (synced),
//! then its removal from the spool (unsynced). A crash between them leaves a message in the
//! spool whose record is already written; delivering it again would write a second final
//! record. So the spool keeps a *checkpoint*: a position in the accounting log such that every
//! final record before it belongs to a message whose removal is on disk. At start the
//! finalizer reads the final records written since the checkpoint (across segments, however
//! the log was rotated) and removes those messages instead of delivering them; only that tail
//! is read.
//!
//! The [`Ledger`] holds the finalizations between "record about to be appended" and "message
//! removed", by the log position they started at; the checkpoint never passes the oldest of
//! them. Storing it is a synced spool write, which also makes every earlier unsynced removal
//! durable (the spool writes in order).

use crate::clock::now_ms;
use crate::error::EngineError;
use accounting::{Accounting, AccountingError, Position, Record};
use queue::{MessageId, MessageMeta, Spool};
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The spool state key of the checkpoint ([`Position::to_bytes`]; 8 bytes in the
/// single-file layout of earlier versions, which is segment 0).
pub(crate) const CHECKPOINT_KEY: &str = "accounting/checkpoint";

/// How often the checkpoint is advanced.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// A stored checkpoint: the log position, and the time from which messages may lack their
/// `Reception` record (an injection in progress at a crash: see [`Finalizer::hold`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Checkpoint {
    pub(crate) at: Position,
    /// Milliseconds since the epoch; `None` in checkpoints of earlier versions.
    pub(crate) since_ms: Option<u64>,
}

impl Checkpoint {
    fn to_bytes(self) -> Vec<u8> {
        let mut out = self.at.to_bytes().to_vec();
        out.extend_from_slice(&self.since_ms.unwrap_or(0).to_be_bytes());
        out
    }

    fn from_bytes(bytes: &[u8]) -> Option<Checkpoint> {
        let at = Position::from_bytes(bytes.get(..16).unwrap_or(bytes))?;
        let since_ms = bytes
            .get(16..24)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes);
        Some(Checkpoint { at, since_ms })
    }
}

/// Finalizations (and injections) in progress, by the log position each started at, with how
/// many and when the oldest of them began.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    open: Mutex<BTreeMap<Position, (usize, u64)>>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Position, (usize, u64)>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A finalization starts; `at` is the log's synced end read now, so its record will
    /// land at or after it.
    pub(crate) fn begin(&self, at: Position) {
        let now = now_ms();
        let mut open = self.lock();
        let entry = open.entry(at).or_insert((0, now));
        entry.0 += 1;
        entry.1 = entry.1.min(now);
    }

    /// A finalization that began at `at` has removed its message (or never wrote its record).
    pub(crate) fn end(&self, at: Position) {
        let mut open = self.lock();
        if let Some((n, _)) = open.get_mut(&at) {
            *n -= 1;
            if *n == 0 {
                open.remove(&at);
            }
        }
    }

    /// The checkpoint that may be stored now (its position). `synced` must be read *before*
    /// this call: a finalization not yet in the ledger then appends at or after it.
    #[cfg(test)]
    fn checkpoint(&self, synced: Position) -> Position {
        self.checkpoint_at(synced, now_ms()).at
    }

    /// The checkpoint with its time: when the oldest open entry began, else `now`.
    fn checkpoint_at(&self, synced: Position, now: u64) -> Checkpoint {
        let open = self.lock();
        let since = open.values().map(|(_, t)| *t).min().unwrap_or(now).min(now);
        let at = open
            .keys()
            .next()
            .map_or(synced, |oldest| (*oldest).min(synced));
        Checkpoint {
            at,
            since_ms: Some(since),
        }
    }
}

/// An injection in progress (see [`Finalizer::hold`]).
#[derive(Debug)]
#[must_use = "a hold keeps the checkpoint back until released"]
pub(crate) struct Hold(Position);

/// Ends messages' lives with exactly one final record each, keeps the checkpoint, and settles
/// what a crash left between the two writes.
#[derive(Debug)]
pub(crate) struct Finalizer {
    accounting: Accounting,
    spool: Spool,
    ledger: Ledger,
    cancel: CancellationToken,
    /// The checkpoint last stored: start-up settlement after a crash reads from there.
    stored: Mutex<Position>,
}

impl Finalizer {
    pub(crate) fn new(accounting: Accounting, spool: Spool, cancel: CancellationToken) -> Self {
        Finalizer {
            accounting,
            spool,
            ledger: Ledger::default(),
            cancel,
            stored: Mutex::new(Position::default()),
        }
    }

    /// Ends a message's life: its final records appended to the accounting log (synced),
    /// then the message removed from the spool. The ledger keeps the checkpoint from passing
    /// the record until the removal is done, so a crash in between leaves a record the next
    /// start finds, and the message is removed then instead of delivered again. Returns
    /// whether the message is gone.
    ///
    /// A step that fails (a full disk) is retried, so the outcome is recorded without
    /// delivering the message twice; the caller waits meanwhile. Only shutdown ends the wait:
    /// a message whose record was not written is attempted again at the next start.
    pub(crate) async fn finalize(&self, meta: &MessageMeta, records: Vec<Record>) -> bool {
        let lines: Vec<String> = records.iter().map(Accounting::to_line).collect();
        let at = self.accounting.synced_position();
        self.ledger.begin(at);
        let mut pause = Duration::from_millis(250);
        while let Err(e) = self
            .accounting
            .record_serialised(&records, lines.clone())
            .await
        {
            // The accounting writer discards a failed batch, so a retry cannot duplicate it.
            tracing::error!(id = %meta.id, error = %e, "could not write the final record; retrying");
            let stop = matches!(e, AccountingError::Stopped) || {
                tokio::select! {
                    _ = self.cancel.cancelled() => true,
                    _ = tokio::time::sleep(pause) => false,
                }
            };
            if stop {
                // Nothing was written: the message stays owed a delivery.
                self.ledger.end(at);
                return false;
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
        // Unsynced: the next checkpoint write (synced, after this one in the spool's order)
        // makes it durable; until then the ledger holds the checkpoint back.
        while let Err(e) = self.spool.remove_lazily(meta.id, meta.due_ms).await {
            tracing::error!(id = %meta.id, error = %e, "could not remove a finished message");
            if !self.wait_for_spool().await {
                // Left in the ledger on purpose: the checkpoint must not pass this record
                // while its message is still spooled.
                return true;
            }
        }
        self.ledger.end(at);
        true
    }

    /// Ends many messages' lives at once (a purge): their records appended as one group
    /// (synced), then the messages removed as one spool write, under the same checkpoint
    /// rule as [`Finalizer::finalize`]. An error before the records are down leaves
    /// everything as it was, for the caller to put back on the schedule.
    pub(crate) async fn finalize_group(
        &self,
        metas: &[MessageMeta],
        records: Vec<Record>,
    ) -> Result<(), AccountingError> {
        let at = self.accounting.synced_position();
        self.ledger.begin(at);
        if let Err(e) = self.accounting.record_all(records).await {
            self.ledger.end(at);
            return Err(e);
        }
        let doomed: Vec<(MessageId, u64)> = metas.iter().map(|m| (m.id, m.due_ms)).collect();
        while let Err(e) = self.spool.remove_many_lazily(doomed.clone()).await {
            tracing::error!(error = %e, "could not remove purged messages");
            if !self.wait_for_spool().await {
                // Left in the ledger on purpose, as in `finalize`.
                return Ok(());
            }
        }
        self.ledger.end(at);
        Ok(())
    }

    /// After a failed spool write: waits until the spool is writable again. False when the
    /// engine shuts down first or the spool is closed.
    async fn wait_for_spool(&self) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        if self.spool.is_writable() {
            // Not a storage error the spool recovers from by itself (it is closing): give up
            // rather than spin.
            return false;
        }
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            _ = self.spool.wait_writable() => true,
        }
    }

    /// The checkpoint stored in the spool, if any.
    pub(crate) fn stored_checkpoint(&self) -> Result<Option<Checkpoint>, EngineError> {
        Ok(self
            .spool
            .state(CHECKPOINT_KEY)?
            .and_then(|v| Checkpoint::from_bytes(&v)))
    }

    async fn store_checkpoint(&self, checkpoint: Checkpoint) -> Result<(), EngineError> {
        self.spool
            .put_state(CHECKPOINT_KEY, checkpoint.to_bytes())
            .await?;
        *self.stored.lock().unwrap_or_else(|p| p.into_inner()) = checkpoint.at;
        Ok(())
    }

    /// An injection begins, before its messages are spooled: the checkpoint stays behind
    /// until [`Finalizer::release`], after their `Reception` records are synced. A crash in
    /// between leaves spooled messages without a Reception record; start-up finds them (see
    /// [`Settled::missing_reception`]) and writes it then. No extra fsync per message.
    pub(crate) fn hold(&self) -> Hold {
        let at = self.accounting.synced_position();
        self.ledger.begin(at);
        Hold(at)
    }

    /// The injection's Reception records are down.
    pub(crate) fn release(&self, hold: Hold) {
        self.ledger.end(hold.0);
    }

    /// At start, before anything is delivered: removes the spooled messages that already have
    /// a final record after the stored checkpoint (the engine stopped between a record and its
    /// message's removal), and stores a checkpoint if there was none. Returns what the reload
    /// needs to find messages whose Reception record a crash lost.
    pub(crate) async fn settle(&self) -> Result<Settled, EngineError> {
        let started_ms = now_ms();
        let stored = self.stored_checkpoint()?;
        if let Some(c) = stored {
            *self.stored.lock().unwrap_or_else(|p| p.into_inner()) = c.at;
        }
        let Some(checkpoint) = stored else {
            // A new spool: none of its messages can have a record before this point.
            let end = Checkpoint {
                at: self.accounting.synced_position(),
                since_ms: Some(started_ms),
            };
            self.store_checkpoint(end).await?;
            return Ok(Settled {
                checkpoint: end.at,
                window: None,
                receptions: HashSet::new(),
            });
        };
        let accounting = self.accounting.clone();
        let recorded = tokio::task::spawn_blocking(move || accounting.ids_since(checkpoint.at))
            .await
            .map_err(|e| EngineError::Config(format!("settling accounting: {e}")))??;
        let mut removed = 0u64;
        for id in recorded
            .finals
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
        Ok(Settled {
            checkpoint: checkpoint.at,
            // Injections after this start write their own records.
            window: checkpoint.since_ms.map(|since| since..started_ms),
            receptions: recorded
                .receptions
                .iter()
                .filter_map(|id| id.parse().ok())
                .collect(),
        })
    }

    /// Advances the checkpoint about once a second until shutdown, so a restart reads only
    /// the last moments of the log.
    pub(crate) async fn keep_checkpoint(&self, mut stored: Position) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
            }
            stored = self.advance_checkpoint(stored).await;
        }
    }

    /// Stores the furthest checkpoint the ledger allows, if it is past `stored`.
    pub(crate) async fn advance_checkpoint(&self, stored: Position) -> Position {
        // In this order: see `Ledger::checkpoint`.
        let synced = self.accounting.synced_position();
        let next = self.ledger.checkpoint_at(synced, now_ms());
        if next.at <= stored {
            return stored;
        }
        match self.store_checkpoint(next).await {
            Ok(()) => next.at,
            Err(e) => {
                tracing::debug!(error = %e, "could not store the accounting checkpoint");
                stored
            }
        }
    }

    /// The last word at a clean stop: the checkpoint as far as it goes (finished messages then
    /// need no look at the log at the next start), and the log told it was closed cleanly.
    pub(crate) async fn close(&self) {
        self.advance_checkpoint(Position::default()).await;
        self.accounting.close().await;
    }

    /// The checkpoint last stored: a start after a crash settles from there, so the log
    /// before it is all retention may delete.
    pub(crate) fn stored_position(&self) -> Position {
        *self.stored.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What start-up settlement found.
#[derive(Debug)]
pub(crate) struct Settled {
    /// The checkpoint in force.
    pub(crate) checkpoint: Position,
    /// Reception times (ms) of spooled messages that may lack a Reception record: those
    /// injected between the checkpoint's time and this start. `None` when nothing can be
    /// missing (a new spool, or a checkpoint of an earlier version).
    window: Option<std::ops::Range<u64>>,
    /// Messages with a Reception record after the checkpoint.
    receptions: HashSet<MessageId>,
}

impl Settled {
    /// Whether a spooled message lacks its Reception record (a crash between its spool write
    /// and its record): it was received in the window and has no record after the checkpoint.
    pub(crate) fn missing_reception(&self, meta: &MessageMeta) -> bool {
        self.window
            .as_ref()
            .is_some_and(|w| w.contains(&meta.received_ms))
            && !self.receptions.contains(&meta.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accounting::RecordType;

    #[test]
    fn the_checkpoint_never_passes_an_open_finalization() {
        let p = |segment, offset| Position::new(segment, offset);
        let ledger = Ledger::default();
        assert_eq!(ledger.checkpoint(p(0, 500)), p(0, 500));
        ledger.begin(p(0, 100));
        ledger.begin(p(0, 100));
        ledger.begin(p(0, 300));
        assert_eq!(ledger.checkpoint(p(0, 500)), p(0, 100));
        ledger.end(p(0, 100));
        assert_eq!(ledger.checkpoint(p(0, 500)), p(0, 100));
        ledger.end(p(0, 100));
        assert_eq!(ledger.checkpoint(p(0, 500)), p(0, 300));
        ledger.end(p(0, 300));
        assert_eq!(ledger.checkpoint(p(0, 700)), p(0, 700));
        // Ending what was never begun changes nothing.
        ledger.end(p(0, 42));
        assert_eq!(ledger.checkpoint(p(0, 700)), p(0, 700));
        // Across a rotation: an open finalization in segment 3 holds back segment 4.
        ledger.begin(p(3, 900));
        assert_eq!(ledger.checkpoint(p(4, 10)), p(3, 900));
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        spool_path: std::path::PathBuf,
        log_path: std::path::PathBuf,
        rotation: accounting::Rotation,
    }

    impl Fixture {
        fn new(rotation: accounting::Rotation) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            Fixture {
                spool_path: dir.path().join("spool"),
                log_path: dir.path().join("acct/accounting.jsonl"),
                _dir: dir,
                rotation,
            }
        }

        /// A finalizer as a (re)started engine has it.
        fn open(&self) -> (Finalizer, Spool, Accounting) {
            let spool = Spool::open(&self.spool_path, queue::SpoolOptions::default()).unwrap();
            let acct = Accounting::open_with(&self.log_path, self.rotation.clone()).unwrap();
            let finalizer = Finalizer::new(acct.clone(), spool.clone(), CancellationToken::new());
            (finalizer, spool, acct)
        }
    }

    /// The process stops: nothing more is written, the spool's files are let go.
    fn stop(finalizer: Finalizer, spool: Spool, acct: Accounting) {
        drop((finalizer, acct));
        spool.close().unwrap();
    }

    async fn spool_message(spool: &Spool, n: u32) -> MessageMeta {
        let meta = MessageMeta {
            id: MessageId::generate(),
            sender: "s@example.test".into(),
            recipient: format!("r{n}@example.test"),
            domain: "example.test".into(),
            campaign: None,
            tenant: None,
            received_ms: 1,
            due_ms: 1,
            attempts: 0,
            headers: Default::default(),
            last_source: None,
            size: 4,
            priority: Default::default(),
            metadata: None,
        };
        spool
            .insert(vec![(meta.clone(), b"body".to_vec())])
            .await
            .unwrap();
        meta
    }

    fn delivery(meta: &MessageMeta) -> Record {
        Record::new(RecordType::Delivery, meta.id.to_string())
    }

    fn finals_in_log(acct: &Accounting) -> Vec<String> {
        acct.reader(Position::default())
            .read(100_000)
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<Record>(&l.text).ok())
            .filter(|r| r.kind.is_final())
            .map(|r| r.id)
            .collect()
    }

    #[tokio::test]
    async fn record_written_and_removal_lost_is_settled_at_start() {
        let fx = Fixture::new(accounting::Rotation::default());
        let (finalizer, spool, acct) = fx.open();
        let checkpoint = finalizer.settle().await.unwrap().checkpoint;
        let done = spool_message(&spool, 1).await;
        let pending = spool_message(&spool, 2).await;
        assert!(finalizer.finalize(&done, vec![delivery(&done)]).await);
        // The crash: the record is down, the removal never happened, the checkpoint is
        // where it was at start.
        acct.record(delivery(&pending)).await.unwrap();
        stop(finalizer, spool, acct);
        let (finalizer, spool, acct) = fx.open();
        assert_eq!(
            finalizer.stored_checkpoint().unwrap().map(|c| c.at),
            Some(checkpoint)
        );
        finalizer.settle().await.unwrap();
        assert!(spool.meta(&pending.id).unwrap().is_none());
        assert!(spool.meta(&done.id).unwrap().is_none());
        let finals = finals_in_log(&acct);
        assert_eq!(finals.len(), 2);
    }

    #[tokio::test]
    async fn no_record_means_the_message_stays_owed() {
        let fx = Fixture::new(accounting::Rotation::default());
        let (finalizer, spool, acct) = fx.open();
        finalizer.settle().await.unwrap();
        let owed = spool_message(&spool, 1).await;
        stop(finalizer, spool, acct);
        let (finalizer, spool, _acct) = fx.open();
        finalizer.settle().await.unwrap();
        assert!(spool.meta(&owed.id).unwrap().is_some());
    }

    #[tokio::test]
    async fn the_checkpoint_stays_behind_a_record_whose_removal_is_pending() {
        let fx = Fixture::new(accounting::Rotation::default());
        let (finalizer, spool, acct) = fx.open();
        let start = finalizer.settle().await.unwrap().checkpoint;
        let meta = spool_message(&spool, 1).await;
        // A finalization in flight: begun, record written, removal not yet done.
        let at = acct.synced_position();
        finalizer.ledger.begin(at);
        acct.record(delivery(&meta)).await.unwrap();
        let stored = finalizer.advance_checkpoint(start).await;
        assert_eq!(stored, at, "the checkpoint passed a pending removal");
        assert!(acct
            .final_ids_since(stored)
            .unwrap()
            .contains(&meta.id.to_string()));
        spool.remove(meta.id, meta.due_ms).await.unwrap();
        finalizer.ledger.end(at);
        let stored = finalizer.advance_checkpoint(stored).await;
        assert_eq!(stored, acct.synced_position());
    }

    #[tokio::test]
    async fn settlement_reads_across_rotated_segments() {
        let fx = Fixture::new(accounting::Rotation {
            size: 600,
            age: None,
            compress: true,
        });
        let (finalizer, spool, acct) = fx.open();
        finalizer.settle().await.unwrap();
        let mut lost = Vec::new();
        for n in 0..30 {
            let meta = spool_message(&spool, n).await;
            if n % 3 == 0 {
                // Removal lost in the crash.
                acct.record(delivery(&meta)).await.unwrap();
                lost.push(meta);
            } else {
                assert!(finalizer.finalize(&meta, vec![delivery(&meta)]).await);
            }
        }
        assert!(acct.synced_position().segment >= 3, "no rotation happened");
        stop(finalizer, spool, acct);
        let (finalizer, spool, acct) = fx.open();
        finalizer.settle().await.unwrap();
        for meta in &lost {
            assert!(spool.meta(&meta.id).unwrap().is_none(), "delivered twice");
        }
        let finals = finals_in_log(&acct);
        assert_eq!(finals.len(), 30);
        let unique: std::collections::HashSet<_> = finals.iter().collect();
        assert_eq!(unique.len(), 30);
    }

    #[tokio::test]
    async fn a_reception_lost_in_a_crash_is_found_at_start_and_only_that_one() {
        let fx = Fixture::new(accounting::Rotation::default());
        let (finalizer, spool, acct) = fx.open();
        let start = finalizer.settle().await.unwrap().checkpoint;
        // An injection whose Reception was written, then one the crash cut short.
        let hold = finalizer.hold();
        let mut done = spool_message(&spool, 1).await;
        done.received_ms = now_ms();
        acct.record(Record::new(RecordType::Reception, done.id.to_string()))
            .await
            .unwrap();
        finalizer.release(hold);
        // Times are in milliseconds: the checkpoint's comes strictly after that reception.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let stored = finalizer.advance_checkpoint(start).await;
        let _hold = finalizer.hold();
        let mut cut = spool_message(&spool, 2).await;
        cut.received_ms = now_ms();
        // The keeper runs on: the checkpoint does not pass the open injection.
        let held = finalizer.advance_checkpoint(stored).await;
        assert!(held <= acct.synced_position());
        stop(finalizer, spool, acct);
        let (finalizer, _spool, _acct) = fx.open();
        let settled = finalizer.settle().await.unwrap();
        assert!(settled.missing_reception(&cut));
        assert!(!settled.missing_reception(&done));
        // A message received after this start is none of settlement's business.
        let mut later = cut.clone();
        later.received_ms = now_ms() + 1000;
        assert!(!settled.missing_reception(&later));
    }

    #[tokio::test]
    async fn a_checkpoint_of_the_single_file_layout_is_read_as_segment_zero() {
        let fx = Fixture::new(accounting::Rotation::default());
        let spool = Spool::open(&fx.spool_path, queue::SpoolOptions::default()).unwrap();
        let meta = spool_message(&spool, 1).await;
        // An older Drover: one file, an 8-byte checkpoint before the record it never
        // removed the message of.
        std::fs::create_dir_all(fx.log_path.parent().unwrap()).unwrap();
        let line = Accounting::to_line(&delivery(&meta));
        std::fs::write(
            &fx.log_path,
            format!("{{\"type\":\"Reception\"}}\n{line}\n"),
        )
        .unwrap();
        spool
            .put_state(CHECKPOINT_KEY, 21u64.to_be_bytes().to_vec())
            .await
            .unwrap();
        spool.close().unwrap();
        drop(spool);
        let (finalizer, spool, _acct) = fx.open();
        assert_eq!(
            finalizer.settle().await.unwrap().checkpoint,
            Position::new(0, 21)
        );
        assert!(spool.meta(&meta.id).unwrap().is_none());
    }
}
