//! Deleting closed segments by age and total size, without pulling records from under a
//! reader that still needs them.

use crate::{Accounting, AccountingError, Position};
use std::time::{Duration, SystemTime};

/// When closed segments are deleted.
#[derive(Debug, Clone, Default)]
pub struct Retention {
    /// Closed segments older than this (by when they were closed) go.
    pub max_age: Option<Duration>,
    /// The oldest closed segments go while all closed segments take more than this.
    pub max_size: Option<u64>,
    /// How many bytes of segments due for deletion are kept for readers (webhooks) that
    /// have not read them yet. Past it the oldest go anyway: a webhook down for days must
    /// not fill the disk.
    pub hold: u64,
}

/// What a [`Accounting::prune`] did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Segments deleted by the rules.
    pub deleted: Vec<u64>,
    /// Segments deleted although a reader still needed them (the hold was exceeded).
    pub forced: Vec<u64>,
    /// Bytes of segments due for deletion but kept for readers.
    pub held_bytes: u64,
    /// Closed segments left, and their bytes on disk.
    pub closed_segments: usize,
    /// Bytes of the closed segments left on disk.
    pub closed_bytes: u64,
}

impl Accounting {
    /// Applies `retention` to the closed segments. Nothing at or after `settle_from` (the
    /// finalizer's checkpoint: start-up settlement reads from there) is ever deleted;
    /// segments at or after `read_from` (the slowest webhook cursor) are kept up to
    /// `retention.hold` bytes.
    pub fn prune(
        &self,
        settle_from: Position,
        read_from: Position,
        retention: &Retention,
    ) -> Result<Pruned, AccountingError> {
        let layout = &self.shared.layout;
        let io = |source| AccountingError::Io {
            path: layout.path.clone(),
            source,
        };
        let current = self.shared.manifest().current;
        let mut segments = Vec::new();
        for (segment, (path, _)) in layout.closed().map_err(io)? {
            if segment >= current {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let closed_at = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            segments.push((segment, path, meta.len(), closed_at));
        }
        let mut total: u64 = segments.iter().map(|s| s.2).sum();
        let now = SystemTime::now();
        let mut pruned = Pruned::default();
        // Due for deletion but not yet read by a webhook, oldest first.
        let mut wanted = Vec::new();
        let mut wanted_bytes = 0;
        for (segment, path, len, closed_at) in &segments {
            let too_old = retention
                .max_age
                .is_some_and(|max| now.duration_since(*closed_at).is_ok_and(|age| age > max));
            let too_big = retention
                .max_size
                .is_some_and(|max| total.saturating_sub(wanted_bytes) > max);
            if !too_old && !too_big {
                continue;
            }
            if *segment >= settle_from.segment {
                break;
            }
            if *segment >= read_from.segment {
                wanted.push((*segment, path, *len));
                wanted_bytes += len;
                continue;
            }
            std::fs::remove_file(path).map_err(io)?;
            remove_csv(layout, *segment);
            total -= len;
            metrics::counter!(crate::metrics_names::SEGMENTS_DELETED, "reason" => "retention")
                .increment(1);
            pruned.deleted.push(*segment);
        }
        // The newest of them are kept up to the hold; the webhook loses the oldest.
        let mut kept = 0;
        let mut keep_from = wanted.len();
        while keep_from > 0 && kept + wanted[keep_from - 1].2 <= retention.hold {
            keep_from -= 1;
            kept += wanted[keep_from].2;
        }
        pruned.held_bytes = kept;
        for (segment, path, len) in &wanted[..keep_from] {
            std::fs::remove_file(path).map_err(io)?;
            remove_csv(layout, *segment);
            total -= len;
            tracing::error!(
                segment,
                file = %path.display(),
                "deleted an accounting segment a webhook has not sent yet: the webhook backlog passed accounting.webhook_hold"
            );
            metrics::counter!(crate::metrics_names::SEGMENTS_DELETED, "reason" => "forced")
                .increment(1);
            pruned.forced.push(*segment);
        }
        pruned.closed_segments = segments.len() - pruned.deleted.len() - pruned.forced.len();
        pruned.closed_bytes = total;
        metrics::gauge!(crate::metrics_names::HELD_BYTES).set(pruned.held_bytes as f64);
        metrics::gauge!(crate::metrics_names::LOG_BYTES)
            .set((total + self.synced_position().offset) as f64);
        Ok(pruned)
    }
}

/// The CSV copy of a deleted segment goes with it.
fn remove_csv(layout: &crate::segments::Layout, segment: u64) {
    let plain = layout.closed_csv_path(segment);
    for file in [plain.with_extension("csv.zst"), plain] {
        match std::fs::remove_file(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "could not delete a CSV accounting segment")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Record, RecordType, Rotation};

    async fn log_with_segments(dir: &std::path::Path) -> Accounting {
        let rotation = Rotation {
            size: 500,
            age: None,
            compress: false,
        };
        let csv = crate::CsvFormat::new(&[]).unwrap();
        let acct = Accounting::open_full(&dir.join("a.jsonl"), rotation, Some(csv)).unwrap();
        for i in 0..20 {
            acct.record(Record::new(RecordType::Delivery, format!("m{i}")))
                .await
                .unwrap();
        }
        acct
    }

    #[tokio::test]
    async fn the_oldest_go_by_size_but_never_what_settlement_needs() {
        let dir = tempfile::tempdir().unwrap();
        let acct = log_with_segments(dir.path()).await;
        let end = acct.synced_position();
        assert!(end.segment >= 6);
        let sizes: Vec<u64> = crate::segments::Layout::new(&dir.path().join("a.jsonl"))
            .closed()
            .unwrap()
            .values()
            .map(|(p, _)| std::fs::metadata(p).unwrap().len())
            .collect();
        let two_newest = sizes[sizes.len() - 1] + sizes[sizes.len() - 2];
        let keep_two = Retention {
            max_size: Some(two_newest),
            ..Retention::default()
        };
        assert!(dir.path().join("acct-000000.csv").exists());
        let pruned = acct.prune(end, end, &keep_two).unwrap();
        assert_eq!(pruned.closed_segments, 2, "{pruned:?}");
        assert!(pruned.closed_bytes <= two_newest);
        assert_eq!(pruned.deleted.first(), Some(&0));
        assert!(!dir.path().join("acct-000000.csv").exists());
        // Settlement from segment 0 would need everything: nothing goes.
        let dir2 = tempfile::tempdir().unwrap();
        let acct2 = log_with_segments(dir2.path()).await;
        let pruned = acct2
            .prune(Position::default(), Position::default(), &keep_two)
            .unwrap();
        assert!(pruned.deleted.is_empty() && pruned.forced.is_empty());
    }

    #[tokio::test]
    async fn a_lagging_reader_holds_segments_up_to_the_hold_then_loses_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let acct = log_with_segments(dir.path()).await;
        let end = acct.synced_position();
        let everything = Retention {
            max_age: Some(Duration::ZERO),
            max_size: None,
            hold: 1 << 20,
        };
        std::thread::sleep(Duration::from_millis(20));
        // The webhook stands at segment 2: 0 and 1 go, the rest is held.
        let pruned = acct.prune(end, Position::new(2, 0), &everything).unwrap();
        assert_eq!(pruned.deleted, vec![0, 1]);
        assert!(pruned.forced.is_empty());
        assert!(pruned.held_bytes > 0);
        let mut reader = acct.reader(Position::new(2, 0));
        assert!(!reader.read(100).unwrap().is_empty());
        // A hold smaller than one segment: the webhook's oldest segments go, said so.
        let tight = Retention {
            hold: 600,
            ..everything
        };
        let pruned = acct.prune(end, Position::new(2, 0), &tight).unwrap();
        assert!(!pruned.forced.is_empty());
        assert_eq!(pruned.forced[0], 2);
        assert!(pruned.held_bytes <= 600);
    }
}
