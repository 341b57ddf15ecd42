//! Exactly one final record per message, without a spool write per message to promise it.
//!
//! A message ends with two writes: its final record appended to the accounting file (synced),
//! then its removal from the spool (unsynced). A crash between them leaves a message in the
//! spool whose record is already written; delivering it again would write a second final
//! record. So the spool keeps a *checkpoint*: an accounting offset such that every final
//! record before it belongs to a message whose removal is on disk. At start the engine reads
//! the final records written since the checkpoint and removes those messages instead of
//! delivering them; only that tail is read.
//!
//! The [`Ledger`] holds the finalizations between "record about to be appended" and "message
//! removed", by the accounting offset they started at; the checkpoint never passes the oldest
//! of them. Storing it is a synced spool write, which also makes every earlier unsynced
//! removal durable (the spool writes in order).

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The spool state key of the checkpoint (big-endian u64 offset into the accounting file).
pub(crate) const CHECKPOINT_KEY: &str = "accounting/checkpoint";

/// Finalizations in progress, by the accounting offset each started at.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    open: Mutex<BTreeMap<u64, usize>>,
}

impl Ledger {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A finalization starts; `offset` is the accounting file's synced length read now, so
    /// its record will land at or after it.
    pub(crate) fn begin(&self, offset: u64) {
        *self.lock().entry(offset).or_default() += 1;
    }

    /// A finalization that began at `offset` has removed its message (or never wrote its
    /// record).
    pub(crate) fn end(&self, offset: u64) {
        let mut open = self.lock();
        if let Some(n) = open.get_mut(&offset) {
            *n -= 1;
            if *n == 0 {
                open.remove(&offset);
            }
        }
    }

    /// The checkpoint that may be stored now. `synced_len` must be read *before* this call:
    /// a finalization not yet in the ledger then appends at or after it.
    pub(crate) fn checkpoint(&self, synced_len: u64) -> u64 {
        self.lock()
            .keys()
            .next()
            .map_or(synced_len, |oldest| (*oldest).min(synced_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn the_checkpoint_never_passes_an_open_finalization() {
        let ledger = Ledger::default();
        assert_eq!(ledger.checkpoint(500), 500);
        ledger.begin(100);
        ledger.begin(100);
        ledger.begin(300);
        assert_eq!(ledger.checkpoint(500), 100);
        ledger.end(100);
        assert_eq!(ledger.checkpoint(500), 100);
        ledger.end(100);
        assert_eq!(ledger.checkpoint(500), 300);
        ledger.end(300);
        assert_eq!(ledger.checkpoint(700), 700);
        // Ending what was never begun changes nothing.
        ledger.end(42);
        assert_eq!(ledger.checkpoint(700), 700);
    }
}
