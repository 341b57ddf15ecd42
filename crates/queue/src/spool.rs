//! RocksDB storage with group-committed, synced writes.

use crate::{MessageId, MessageMeta, QueueError};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread;
use tokio::sync::oneshot;

const CF_META: &str = "meta";
const CF_BODY: &str = "body";
const CF_SCHEDULE: &str = "schedule";
const CF_STATE: &str = "state";

/// Tunables of the spool.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Sync the WAL before answering a write (the durability promise). Only benchmarks that
    /// compare against unsynced MTAs turn this off.
    pub sync: bool,
    /// Bodies at least this large go to RocksDB blob files instead of the LSM tree, so they are
    /// not rewritten by every compaction.
    pub min_blob_size: u64,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            sync: true,
            min_blob_size: 4096,
        }
    }
}

enum Op {
    Insert(MessageMeta, Vec<u8>),
    Update {
        meta: MessageMeta,
        previous_due_ms: u64,
    },
    Remove {
        id: MessageId,
        due_ms: u64,
    },
    PutState {
        key: String,
        value: Vec<u8>,
    },
    DeleteState {
        key: String,
    },
}

struct Job {
    ops: Vec<Op>,
    /// Whether the caller needs the write synced before its answer.
    durable: bool,
    done: oneshot::Sender<Result<(), String>>,
}

enum Msg {
    Write(Job),
    /// Stop the writer; it answers after dropping its handle on the database.
    Close(mpsc::Sender<()>),
}

/// The durable spool. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    db: Arc<DB>,
    tx: mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.db.path())
            .finish()
    }
}

fn schedule_key(due_ms: u64, id: &MessageId) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&due_ms.to_be_bytes());
    key[8..].copy_from_slice(id.as_bytes());
    key
}

impl Spool {
    /// Opens (or creates) the spool at `path`.
    pub fn open(path: &Path, options: SpoolOptions) -> Result<Spool, QueueError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        let mut body_opts = Options::default();
        body_opts.set_enable_blob_files(true);
        body_opts.set_min_blob_size(options.min_blob_size);
        body_opts.set_enable_blob_gc(true);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_BODY, body_opts),
            ColumnFamilyDescriptor::new(CF_SCHEDULE, Options::default()),
            ColumnFamilyDescriptor::new(CF_STATE, Options::default()),
        ];
        let db = Arc::new(DB::open_cf_descriptors(&db_opts, path, cfs)?);
        let (tx, rx) = mpsc::channel();
        let writer_db = Arc::clone(&db);
        let sync = options.sync;
        thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer_loop(writer_db, &rx, sync))
            .map_err(|e| QueueError::Corrupt {
                id: String::new(),
                reason: format!("cannot start the spool writer: {e}"),
            })?;
        Ok(Spool { db, tx })
    }

    async fn submit(&self, ops: Vec<Op>) -> Result<(), QueueError> {
        self.submit_with(ops, true).await
    }

    async fn submit_with(&self, ops: Vec<Op>, durable: bool) -> Result<(), QueueError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Write(Job { ops, durable, done }))
            .map_err(|_| QueueError::Closed)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(QueueError::Write(reason)),
            Err(_) => Err(QueueError::Closed),
        }
    }

    /// Stores new messages; returns once they are synced. All or nothing.
    pub async fn insert(&self, messages: Vec<(MessageMeta, Vec<u8>)>) -> Result<(), QueueError> {
        let ops = messages
            .into_iter()
            .map(|(meta, body)| Op::Insert(meta, body))
            .collect();
        self.submit(ops).await
    }

    /// Rewrites a message's metadata (attempts, due time); returns once synced.
    pub async fn update(&self, meta: MessageMeta, previous_due_ms: u64) -> Result<(), QueueError> {
        self.submit(vec![Op::Update {
            meta,
            previous_due_ms,
        }])
        .await
    }

    /// Deletes a message; returns once synced.
    pub async fn remove(&self, id: MessageId, due_ms: u64) -> Result<(), QueueError> {
        self.submit(vec![Op::Remove { id, due_ms }]).await
    }

    /// Deletes a message without waiting for a sync: for callers whose state survives a lost
    /// delete anyway (a message marked `finalizing` is cleaned up at the next start). The
    /// write still goes through the same ordered queue, so it is never overtaken.
    pub async fn remove_lazily(&self, id: MessageId, due_ms: u64) -> Result<(), QueueError> {
        self.submit_with(vec![Op::Remove { id, due_ms }], false)
            .await
    }

    /// Rewrites metadata without waiting for a sync: for updates whose loss only repeats work
    /// (a retry time or attempt count falling back to its previous value after a crash).
    pub async fn update_lazily(
        &self,
        meta: MessageMeta,
        previous_due_ms: u64,
    ) -> Result<(), QueueError> {
        self.submit_with(
            vec![Op::Update {
                meta,
                previous_due_ms,
            }],
            false,
        )
        .await
    }

    /// Stores an engine state record (e.g. a suspension); returns once synced.
    pub async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<(), QueueError> {
        self.submit(vec![Op::PutState {
            key: key.to_owned(),
            value,
        }])
        .await
    }

    /// Deletes an engine state record; returns once synced.
    pub async fn delete_state(&self, key: &str) -> Result<(), QueueError> {
        self.submit(vec![Op::DeleteState {
            key: key.to_owned(),
        }])
        .await
    }

    /// Every state record whose key starts with `prefix`.
    pub fn states(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, QueueError> {
        let cf = self.cf(CF_STATE)?;
        let mut out = Vec::new();
        for item in self.db.prefix_iterator_cf(cf, prefix.as_bytes()) {
            let (k, v) = item?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Reads a message's metadata.
    pub fn meta(&self, id: &MessageId) -> Result<Option<MessageMeta>, QueueError> {
        let cf = self.cf(CF_META)?;
        match self.db.get_pinned_cf(cf, id.as_bytes())? {
            None => Ok(None),
            Some(bytes) => decode_meta(id, &bytes).map(Some),
        }
    }

    /// Reads a message's body.
    pub fn body(&self, id: &MessageId) -> Result<Option<Vec<u8>>, QueueError> {
        let cf = self.cf(CF_BODY)?;
        Ok(self.db.get_cf(cf, id.as_bytes())?)
    }

    /// Every stored message's metadata, in id (reception) order. Used to rebuild the schedule
    /// at start-up; a record that does not decode is reported, not skipped silently.
    pub fn scan(&self) -> impl Iterator<Item = Result<MessageMeta, QueueError>> + '_ {
        let cf = self.cf(CF_META);
        let iter = cf
            .ok()
            .map(|cf| self.db.iterator_cf(cf, rocksdb::IteratorMode::Start));
        iter.into_iter().flatten().map(|item| {
            let (key, value) = item?;
            let id = MessageId::from_slice(&key)?;
            decode_meta(&id, &value)
        })
    }

    /// Syncs the WAL; used at shutdown.
    pub fn flush(&self) -> Result<(), QueueError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Flushes and stops the writer thread. Later writes fail with [`QueueError::Closed`]; the
    /// database itself closes when the last clone of this handle is dropped.
    pub fn close(&self) -> Result<(), QueueError> {
        let flushed = self.flush();
        let (ack, wait) = mpsc::channel();
        if self.tx.send(Msg::Close(ack)).is_ok() {
            let _ = wait.recv();
        }
        flushed
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, QueueError> {
        self.db.cf_handle(name).ok_or_else(|| QueueError::Corrupt {
            id: String::new(),
            reason: format!("column family {name} is missing"),
        })
    }
}

fn decode_meta(id: &MessageId, bytes: &[u8]) -> Result<MessageMeta, QueueError> {
    serde_json::from_slice(bytes).map_err(|e| QueueError::Corrupt {
        id: id.to_string(),
        reason: e.to_string(),
    })
}

fn writer_loop(db: Arc<DB>, rx: &mpsc::Receiver<Msg>, sync: bool) {
    let mut synced = WriteOptions::default();
    synced.set_sync(sync);
    let lazy = WriteOptions::default();
    let mut closing = None;
    while let Ok(first) = rx.recv() {
        // Everything queued while the last sync ran goes into one batch: the group commit.
        let mut jobs = Vec::new();
        for msg in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match msg {
                Msg::Write(job) => jobs.push(job),
                Msg::Close(ack) => closing = Some(ack),
            }
        }
        if !jobs.is_empty() {
            // One durable job makes the whole batch synced; lazy ones then ride along free.
            let opts = if jobs.iter().any(|j| j.durable) {
                &synced
            } else {
                &lazy
            };
            let result = write_jobs(&db, &jobs, opts);
            if let Err(e) = &result {
                tracing::error!(error = %e, "spool write failed");
            }
            for job in jobs {
                let _ = job.done.send(result.clone());
            }
        }
        if closing.is_some() {
            break;
        }
    }
    drop(db);
    if let Some(ack) = closing {
        let _ = ack.send(());
    }
}

fn write_jobs(db: &DB, jobs: &[Job], write_opts: &WriteOptions) -> Result<(), String> {
    let cf = |name: &str| {
        db.cf_handle(name)
            .ok_or_else(|| format!("column family {name} is missing"))
    };
    let (meta_cf, body_cf, sched_cf, state_cf) =
        (cf(CF_META)?, cf(CF_BODY)?, cf(CF_SCHEDULE)?, cf(CF_STATE)?);
    let mut batch = WriteBatch::default();
    for job in jobs {
        for op in &job.ops {
            match op {
                Op::Insert(meta, body) => {
                    let value = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
                    batch.put_cf(meta_cf, meta.id.as_bytes(), value);
                    batch.put_cf(body_cf, meta.id.as_bytes(), body);
                    batch.put_cf(sched_cf, schedule_key(meta.due_ms, &meta.id), b"");
                }
                Op::Update {
                    meta,
                    previous_due_ms,
                } => {
                    let value = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
                    batch.put_cf(meta_cf, meta.id.as_bytes(), value);
                    batch.delete_cf(sched_cf, schedule_key(*previous_due_ms, &meta.id));
                    batch.put_cf(sched_cf, schedule_key(meta.due_ms, &meta.id), b"");
                }
                Op::Remove { id, due_ms } => {
                    batch.delete_cf(meta_cf, id.as_bytes());
                    batch.delete_cf(body_cf, id.as_bytes());
                    batch.delete_cf(sched_cf, schedule_key(*due_ms, id));
                }
                Op::PutState { key, value } => batch.put_cf(state_cf, key.as_bytes(), value),
                Op::DeleteState { key } => batch.delete_cf(state_cf, key.as_bytes()),
            }
        }
    }
    db.write_opt(batch, write_opts).map_err(|e| e.to_string())
}

#[cfg(test)]
pub(crate) fn schedule_key_for_tests(due_ms: u64, id: &MessageId) -> Vec<u8> {
    schedule_key(due_ms, id).to_vec()
}

#[cfg(test)]
impl Spool {
    pub(crate) fn schedule_keys(&self) -> Vec<Vec<u8>> {
        let Ok(cf) = self.cf(CF_SCHEDULE) else {
            return Vec::new();
        };
        self.db
            .iterator_cf(cf, rocksdb::IteratorMode::Start)
            .filter_map(Result::ok)
            .map(|(k, _)| k.to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn meta(recipient: &str, due_ms: u64) -> MessageMeta {
        MessageMeta {
            id: MessageId::generate(),
            sender: "s@example.com".into(),
            recipient: recipient.into(),
            domain: "example.test".into(),
            campaign: Some("c".into()),
            tenant: None,
            received_ms: 1,
            due_ms,
            attempts: 0,
            headers: BTreeMap::new(),
            last_source: None,
            size: 5,
            finalizing: None,
        }
    }

    #[tokio::test]
    async fn insert_update_remove_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let a = meta("a@example.test", 10);
        let b = meta("b@example.test", 20);
        {
            let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            spool
                .insert(vec![
                    (a.clone(), b"hello".to_vec()),
                    (b.clone(), vec![b'x'; 10_000]),
                ])
                .await
                .unwrap();
            let mut a2 = a.clone();
            a2.attempts = 1;
            a2.due_ms = 99;
            spool.update(a2, 10).await.unwrap();
            spool.remove(b.id, 20).await.unwrap();
            spool.close().unwrap();
            assert!(spool.remove(a.id, 99).await.is_err());
        }
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let all: Vec<_> = spool.scan().collect::<Result<_, _>>().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].id, a.id);
        assert_eq!(all[0].attempts, 1);
        assert_eq!(all[0].due_ms, 99);
        assert_eq!(spool.body(&a.id).unwrap().unwrap(), b"hello");
        assert!(spool.body(&b.id).unwrap().is_none());
        assert!(spool.meta(&b.id).unwrap().is_none());
        // The schedule index holds exactly the one current key.
        let sched = spool.cf(CF_SCHEDULE).unwrap();
        let keys: Vec<_> = spool
            .db
            .iterator_cf(sched, rocksdb::IteratorMode::Start)
            .map(|kv| kv.unwrap().0.to_vec())
            .collect();
        assert_eq!(keys, vec![schedule_key(99, &a.id).to_vec()]);
    }

    #[tokio::test]
    async fn state_records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            spool
                .put_state("suspend/domain/a.test", vec![1])
                .await
                .unwrap();
            spool
                .put_state("suspend/campaign/nov", vec![2])
                .await
                .unwrap();
            spool.put_state("other", vec![3]).await.unwrap();
            spool.delete_state("suspend/campaign/nov").await.unwrap();
            spool.close().unwrap();
        }
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let states = spool.states("suspend/").unwrap();
        assert_eq!(states, vec![("suspend/domain/a.test".to_owned(), vec![1])]);
    }

    #[tokio::test]
    async fn concurrent_inserts_are_all_stored() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..50 {
            let spool = spool.clone();
            tasks.push(tokio::spawn(async move {
                let m = meta(&format!("r{i}@example.test"), i);
                spool.insert(vec![(m, b"body".to_vec())]).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(spool.scan().count(), 50);
    }
}
