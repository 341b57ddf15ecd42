//! Inject requests stored for deferred generation (KumoMTA's `deferred_generation`): the
//! request is kept here, synced, before its client is answered, and expanded into messages
//! later, a chunk of recipients at a time.
//!
//! Keys of the `generation` column family: `r` ++ id → the request (opaque to the spool),
//! `p` ++ id → the index of the next recipient to expand (u64, big-endian; absent means 0).
//! Each chunk's messages and the marker that moves past them are one `WriteBatch`
//! ([`Spool::insert_generated`]), so a crash at any point leaves either both or neither:
//! resuming from the marker stores every recipient's message exactly once.

use super::{cf, Op, Spool, CF_GENERATION};
use crate::{MessageId, MessageMeta, QueueError};
use rocksdb::{ColumnFamily, WriteBatch};

const REQUEST: u8 = b'r';
const PROGRESS: u8 = b'p';

fn key(kind: u8, id: &MessageId) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = kind;
    key[1..].copy_from_slice(id.as_bytes());
    key
}

/// A write to the `generation` column family.
pub(super) enum GenerationOp {
    /// A new request, with no progress yet.
    Store { id: MessageId, request: Vec<u8> },
    /// The marker moves from `previous` to `next`.
    Progress {
        id: MessageId,
        next: u64,
        previous: u64,
    },
    /// The request is done: it and its marker go.
    Finish { id: MessageId },
}

/// How to take back a generation write whose batch failed but may have reached the disk
/// (only its sync failed): its caller was told it failed and will do it again.
pub(super) enum GenerationUndo {
    /// Delete a request stored by the failed batch (its client was answered 503).
    Forget(MessageId),
    /// Set a marker back (the failed batch's messages are deleted too).
    Rewind { id: MessageId, previous: u64 },
}

impl GenerationOp {
    pub(super) fn size(&self) -> usize {
        match self {
            GenerationOp::Store { request, .. } => request.len() + 64,
            GenerationOp::Progress { .. } | GenerationOp::Finish { .. } => 64,
        }
    }

    pub(super) fn write(&self, batch: &mut WriteBatch, cf: &ColumnFamily) {
        match self {
            GenerationOp::Store { id, request } => {
                batch.put_cf(cf, key(REQUEST, id), request);
                batch.delete_cf(cf, key(PROGRESS, id));
            }
            GenerationOp::Progress { id, next, .. } => {
                batch.put_cf(cf, key(PROGRESS, id), next.to_be_bytes());
            }
            GenerationOp::Finish { id } => {
                batch.delete_cf(cf, key(REQUEST, id));
                batch.delete_cf(cf, key(PROGRESS, id));
            }
        }
    }

    /// A finished request that is found again simply finishes again: nothing to undo.
    pub(super) fn undo(&self) -> Option<GenerationUndo> {
        match self {
            GenerationOp::Store { id, .. } => Some(GenerationUndo::Forget(*id)),
            GenerationOp::Progress { id, previous, .. } => Some(GenerationUndo::Rewind {
                id: *id,
                previous: *previous,
            }),
            GenerationOp::Finish { .. } => None,
        }
    }
}

impl GenerationUndo {
    pub(super) fn apply(&self, batch: &mut WriteBatch, cf: &ColumnFamily) {
        match self {
            GenerationUndo::Forget(id) => {
                batch.delete_cf(cf, key(REQUEST, id));
                batch.delete_cf(cf, key(PROGRESS, id));
            }
            GenerationUndo::Rewind { id, previous } => {
                batch.put_cf(cf, key(PROGRESS, id), previous.to_be_bytes());
            }
        }
    }
}

impl Spool {
    /// Stores an inject request for deferred generation under `id` (a fresh UUIDv7, so
    /// requests sort in the order they came); returns once synced.
    pub async fn store_generation(
        &self,
        id: MessageId,
        request: Vec<u8>,
    ) -> Result<(), QueueError> {
        self.submit(vec![Op::Generation(GenerationOp::Store { id, request })])
            .await
    }

    /// Stores the messages made for a stored request's recipients `previous..next` and moves
    /// its marker to `next`, as one write: both or neither, even across a crash. Returns once
    /// synced.
    pub async fn insert_generated(
        &self,
        messages: Vec<(MessageMeta, Vec<u8>)>,
        id: MessageId,
        previous: u64,
        next: u64,
    ) -> Result<(), QueueError> {
        let mut ops: Vec<Op> = messages
            .into_iter()
            .map(|(meta, body)| Op::Insert(meta, body))
            .collect();
        ops.push(Op::Generation(GenerationOp::Progress {
            id,
            next,
            previous,
        }));
        self.submit(ops).await
    }

    /// Drops a stored request once every recipient is expanded; returns once synced.
    pub async fn finish_generation(&self, id: MessageId) -> Result<(), QueueError> {
        self.submit(vec![Op::Generation(GenerationOp::Finish { id })])
            .await
    }

    /// The ids of the stored requests, oldest first, at most `limit`. Reads keys only: the
    /// requests themselves may be large.
    pub fn generations(&self, limit: usize) -> Result<Vec<MessageId>, QueueError> {
        self.with_db(|db| {
            let mut out = Vec::new();
            let mut it = db.raw_iterator_cf(cf(db, CF_GENERATION)?);
            it.seek([REQUEST]);
            while out.len() < limit {
                match it.key().and_then(<[u8]>::split_first) {
                    Some((&REQUEST, id)) => out.push(MessageId::from_slice(id)?),
                    _ => break,
                }
                it.next();
            }
            it.status()?;
            Ok(out)
        })
    }

    /// A stored request and the index of its next recipient; `None` once it is finished.
    pub fn generation(&self, id: &MessageId) -> Result<Option<(Vec<u8>, u64)>, QueueError> {
        self.with_db(|db| {
            let handle = cf(db, CF_GENERATION)?;
            let Some(request) = db.get_cf(handle, key(REQUEST, id))? else {
                return Ok(None);
            };
            let next = match db.get_pinned_cf(handle, key(PROGRESS, id))? {
                None => 0,
                Some(v) => <[u8; 8]>::try_from(&v[..])
                    .map(u64::from_be_bytes)
                    .map_err(|_| QueueError::Corrupt {
                        id: id.to_string(),
                        reason: format!("generation progress of {} bytes", v.len()),
                    })?,
            };
            Ok(Some((request, next)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SpoolOptions;

    fn meta(recipient: &str) -> MessageMeta {
        MessageMeta {
            id: MessageId::generate(),
            sender: "s@example.com".into(),
            recipient: recipient.into(),
            domain: "example.test".into(),
            campaign: None,
            tenant: None,
            received_ms: 1,
            due_ms: 1,
            attempts: 0,
            headers: Default::default(),
            last_source: None,
            priority: Default::default(),
            metadata: None,
            arrived_ms: None,
            size: 2,
        }
    }

    #[tokio::test]
    async fn requests_and_progress_survive_a_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (MessageId::generate(), MessageId::generate());
        {
            let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            spool
                .store_generation(first, b"one".to_vec())
                .await
                .unwrap();
            spool
                .store_generation(second, b"two".to_vec())
                .await
                .unwrap();
            assert_eq!(
                spool.generation(&first).unwrap(),
                Some((b"one".to_vec(), 0))
            );
            let chunk = vec![(meta("a@example.test"), b"hi".to_vec())];
            spool.insert_generated(chunk, first, 0, 1).await.unwrap();
            spool.close().unwrap();
        }
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(spool.generations(usize::MAX).unwrap(), vec![first, second]);
        assert_eq!(spool.generations(1).unwrap(), vec![first]);
        assert_eq!(
            spool.generation(&first).unwrap(),
            Some((b"one".to_vec(), 1))
        );
        assert_eq!(spool.scan().count(), 1);
        spool.finish_generation(first).await.unwrap();
        assert_eq!(spool.generation(&first).unwrap(), None);
        assert_eq!(spool.generations(usize::MAX).unwrap(), vec![second]);
    }

    #[tokio::test]
    async fn a_chunk_that_fails_on_a_full_disk_leaves_neither_messages_nor_marker() {
        let Some(disk) = crate::testing::SmallDisk::mount("16m") else {
            eprintln!("skipping: cannot mount a tmpfs (needs root)");
            return;
        };
        let ballast = disk.path().join("ballast");
        std::fs::write(&ballast, vec![0u8; 9 << 20]).unwrap();
        let path = disk.path().join("spool");
        let spool = Spool::open(&path, SpoolOptions::default()).unwrap();
        let id = MessageId::generate();
        spool
            .store_generation(id, b"request".to_vec())
            .await
            .unwrap();
        let mut next = 0u64;
        loop {
            let chunk = (next..next + 2)
                .map(|i| (meta(&format!("r{i}@example.test")), vec![b'x'; 200_000]))
                .collect();
            match spool.insert_generated(chunk, id, next, next + 2).await {
                Ok(()) => next += 2,
                Err(_) => break,
            }
            assert!(next < 400, "the disk never filled up");
        }
        assert!(next > 0);
        // Refused while the spool is read-only: its client gets a 503, nothing is kept.
        let late = MessageId::generate();
        assert!(spool
            .store_generation(late, b"late".to_vec())
            .await
            .is_err());
        std::fs::remove_file(&ballast).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), spool.wait_writable())
            .await
            .expect("the spool recovers once space returns");
        let check = |spool: &Spool| {
            assert_eq!(
                spool.generation(&id).unwrap(),
                Some((b"request".to_vec(), next))
            );
            assert_eq!(spool.scan().count() as u64, next);
            assert_eq!(spool.generations(usize::MAX).unwrap(), vec![id]);
        };
        check(&spool);
        spool.close().unwrap();
        drop(spool);
        let spool = Spool::open(&path, SpoolOptions::default()).unwrap();
        check(&spool);
        drop(spool);
        drop(disk);
    }
}
