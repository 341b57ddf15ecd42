//! RocksDB storage with group-committed, synced writes, and recovery from storage errors.
//!
//! # Full disk and other storage errors
//!
//! RocksDB 7.8 treats a failed WAL write (ENOSPC, EIO) as a hard background error: every later
//! write of that `DB` instance fails, even once space returns, and this library version has no
//! `DB::Resume` binding. Reads keep working. So the writer thread, on a failed batch:
//! - answers that batch's callers with [`QueueError::Write`] (nothing of it was applied: the
//!   torn WAL record is dropped when the log is replayed) and marks the spool *degraded*:
//!   [`Spool::is_writable`] turns false and the gauge `drover_spool_writable` drops to 0;
//! - answers every later write at once with [`QueueError::Unwritable`], without touching the
//!   disk, while reads go on from the failed instance;
//! - probes every second whether the file system has room for a reopen (free space at least
//!   the WAL's size plus [`REOPEN_HEADROOM`]; a failed reopen leaves an orphan table file and
//!   costs a flush, so it is not tried blindly), and when it has, closes the database and opens
//!   it again. Opening replays the WAL, so everything acknowledged is there. If the read-write
//!   open fails, a read-only instance serves reads and the next attempt backs off (up to
//!   [`MAX_REOPEN_BACKOFF`]).
//! - After a successful reopen it deletes any message of the failed batch that reached the
//!   disk after all (possible if only the sync failed): its callers were told it failed.
//!
//! Readers hold a read lock on the instance only for one lookup (scans: for one chunk), so the
//! writer can swap instances without anyone keeping the old one open.
//!
//! RocksDB's info log (`LOG`) is kept at the `Fatal` level: Debian's librocksdb is built with
//! assertions, and a second append to a `LOG` whose previous append failed with ENOSPC aborts
//! the process. For the same reason [`Spool::flush`] does not touch a failed instance's WAL.

mod generation;

use crate::suppression::{Sent, Suppression, SuppressionKey};
use crate::{MessageId, MessageMeta, QueueError};
use generation::{GenerationOp, GenerationUndo};
use rocksdb::{ColumnFamilyDescriptor, LogLevel, Options, WriteBatch, WriteOptions, DB};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

const CF_META: &str = "meta";
const CF_BODY: &str = "body";
const CF_SCHEDULE: &str = "schedule";
const CF_STATE: &str = "state";
/// The suppression list: key tenant, 0, address; value a JSON [`Suppression`].
const CF_SUPPRESSION: &str = "suppression";
/// What is remembered of every message for matching late reports: key the message id
/// (UUIDv7, so in time order), value a JSON [`Sent`]; trimmed by age ([`Spool::expire_sent`]).
const CF_SENT: &str = "sent";
/// Message-IDs a client wrote, to the message id (value: the 16-byte UUIDv7, whose time the
/// compaction filter reads to drop entries past their retention).
const CF_MESSAGE_IDS: &str = "message_ids";
/// Inject requests stored for deferred generation and how far each is expanded (see the
/// `generation` module).
const CF_GENERATION: &str = "generation";
/// Every column family (flushed at close, counted in the memory figures).
const ALL_CFS: &[&str] = &[
    CF_META,
    CF_BODY,
    CF_SCHEDULE,
    CF_STATE,
    CF_SUPPRESSION,
    CF_SENT,
    CF_MESSAGE_IDS,
    CF_GENERATION,
];

/// Gauge: 1 while the spool accepts writes, 0 while it is degraded after a storage error.
pub(crate) const WRITABLE_GAUGE: &str = "drover_spool_writable";
/// Time to write one group commit (RocksDB's write-ahead log and memtables), seconds.
pub const WRITE_HISTOGRAM: &str = "drover_spool_write_duration_seconds";
/// Time to sync the write-ahead log after a group commit that needs it, seconds.
pub const FSYNC_HISTOGRAM: &str = "drover_spool_fsync_duration_seconds";

/// Free space wanted beyond the WAL's size before a reopen is tried: the reopen flushes the
/// replayed WAL into table and blob files, and writes a new MANIFEST and OPTIONS file.
pub const REOPEN_HEADROOM: u64 = 4 << 20;
/// How often a degraded spool checks for free space.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between reopen attempts that failed although space seemed available.
pub const MAX_REOPEN_BACKOFF: Duration = Duration::from_secs(16);
/// A group commit is written as several batches of about this size (synced once, at the
/// end): one batch of 80 MB (8 requests of 100 messages of 100 KB) is a fresh `mmap` whose
/// every page faults in, while batches this size reuse the allocator's heap (measured: page
/// faults were 12 % of the engine's CPU at 100 KB).
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Metadata records a scan reads under one read lock.
const SCAN_CHUNK: usize = 1024;
/// The default of [`SpoolOptions::max_pending_write_bytes`].
pub const DEFAULT_PENDING_WRITE_BYTES: usize = 256 << 20;
/// The unit of [`SpoolOptions::max_pending_write_bytes`] accounting (semaphore permits are u32).
const PENDING_UNIT: usize = 4096;

/// Tunables of the spool.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Sync the WAL before answering a write (the durability promise). Only benchmarks that
    /// compare against unsynced MTAs turn this off.
    pub sync: bool,
    /// Bodies at least this large go to RocksDB blob files instead of the LSM tree, so they are
    /// not rewritten by every compaction.
    pub min_blob_size: u64,
    /// Size of the body column family's memtable. A body deleted (delivered) while still in
    /// the memtable is dropped by the flush and never written to a blob file, so a relay that
    /// delivers within seconds gains from a larger one (measured at 20 KB: delivery alone
    /// 0.52 → 0.85 of the baseline with 256 MiB in a short run), at the price of that much
    /// memory, up to three times while flushes run. The default is RocksDB's own.
    pub body_buffer_bytes: usize,
    /// Bytes of writes queued for the writer thread and not yet answered; callers beyond it
    /// wait for room (back-pressure) instead of piling bodies up in memory while a sync is
    /// slow. One write larger than this still goes, alone.
    pub max_pending_write_bytes: usize,
    /// What RocksDB may hold in memory in all: the memtables of every column family (at most
    /// seven eighths; the body buffer is capped at half) and one block cache shared by them
    /// (an eighth). It also caps the write-ahead log, so that a column family written rarely
    /// (the engine's state) cannot keep every older log alive, and a start replays at most
    /// this much.
    pub memory_budget_bytes: usize,
    /// How long the Message-ID index ([`Spool::index_message_ids`]) keeps an entry: older
    /// ones are dropped as compactions meet them.
    pub message_id_retention: Duration,
}

/// The default of [`SpoolOptions::memory_budget_bytes`].
pub const DEFAULT_MEMORY_BUDGET_BYTES: usize = 256 << 20;

fn pending_units(options: &SpoolOptions) -> usize {
    (options.max_pending_write_bytes / PENDING_UNIT).max(1)
}

/// The default body memtable size: 64 MiB, RocksDB's default. With 256 MiB a restart
/// on 1 M queued messages held 360–670 bytes of RSS per message instead of 280.
pub const DEFAULT_BODY_BUFFER_BYTES: usize = 64 << 20;

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            sync: true,
            min_blob_size: 4096,
            body_buffer_bytes: DEFAULT_BODY_BUFFER_BYTES,
            max_pending_write_bytes: DEFAULT_PENDING_WRITE_BYTES,
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
            message_id_retention: Duration::from_secs(7 * 86_400),
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
    Suppress {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Unsuppress {
        key: Vec<u8>,
    },
    IndexMessageId {
        key: String,
        id: MessageId,
    },
    Generation(GenerationOp),
}

impl Op {
    /// About how many bytes the op holds in memory until it is written.
    fn size(&self) -> usize {
        match self {
            Op::Insert(meta, body) => body.len() + meta.recipient.len() + 256,
            Op::PutState { key, value } => key.len() + value.len() + 64,
            Op::Suppress { key, value } => key.len() + value.len() + 64,
            Op::Unsuppress { key } => key.len() + 64,
            Op::IndexMessageId { key, .. } => key.len() + 64,
            Op::Generation(op) => op.size(),
            Op::Update { .. } | Op::Remove { .. } | Op::DeleteState { .. } => 256,
        }
    }
}

/// Why a write was refused.
#[derive(Debug, Clone)]
enum Refusal {
    /// This batch failed.
    Failed(String),
    /// The spool is degraded since an earlier failure.
    Unwritable(String),
}

struct Job {
    ops: Vec<Op>,
    /// Whether the caller needs the write synced before its answer.
    durable: bool,
    done: oneshot::Sender<Result<(), Refusal>>,
}

enum Msg {
    Write(Job),
    /// Stop the writer; it answers after dropping its handle on the database.
    Close(mpsc::Sender<()>),
}

/// What the handles and the writer thread share.
struct Shared {
    path: PathBuf,
    options: SpoolOptions,
    /// The open instance. `None` only while the writer swaps instances, or when even a
    /// read-only open failed after a storage error.
    db: RwLock<Option<DB>>,
    /// Whether writes are accepted (false while degraded after a storage error).
    writable: watch::Sender<bool>,
    /// Room in the writer's queue, in [`PENDING_UNIT`]s.
    pending: tokio::sync::Semaphore,
    /// Body buffers given back after use ([`Spool::recycle`]): a reader fills one instead of
    /// a fresh allocation, whose pages would all fault in again (at 100 KB bodies, page
    /// faults were a quarter of the delivery path's CPU).
    buffers: std::sync::Mutex<Recycled>,
    /// Message inserts, updates and removals written so far ([`Spool::message_writes`]).
    message_writes: std::sync::atomic::AtomicU64,
    /// Test hook: the next this many reads fail (feature `testing`).
    #[cfg(any(test, feature = "testing"))]
    failing_reads: std::sync::atomic::AtomicUsize,
}

/// The durable spool. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Msg>,
    /// The reader threads ([`Spool::read_message`]).
    readers: Arc<Readers>,
}

/// The reader threads and the way to them. They hold the database open, so they are stopped
/// and joined at close, or when the last handle goes: then the directory can be opened again
/// at once.
struct Readers {
    reads: mpsc::Sender<ReadMsg>,
    threads: std::sync::Mutex<Vec<thread::JoinHandle<()>>>,
}

impl Readers {
    fn stop(&self) {
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for _ in &threads {
            let _ = self.reads.send(ReadMsg::Stop);
        }
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool")
            .field("path", &self.shared.path)
            .field("writable", &self.is_writable())
            .finish()
    }
}

fn schedule_key(due_ms: u64, id: &MessageId) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&due_ms.to_be_bytes());
    key[8..].copy_from_slice(id.as_bytes());
    key
}

fn db_options(options: &SpoolOptions) -> Options {
    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_max_background_jobs(2);
    // See the module header: anything above Fatal can abort the process on a full disk.
    db_opts.set_log_level(LogLevel::Fatal);
    // Every open rotates the (empty) LOG; failed reopens on a full disk must not pile them up.
    db_opts.set_keep_log_file_num(4);
    let budget = options.memory_budget_bytes.max(8 << 20);
    // All memtables together; past it RocksDB flushes the largest.
    db_opts.set_db_write_buffer_size(budget / 8 * 7);
    // Without a cap, the state column family (a checkpoint a second, never enough to fill a
    // memtable) keeps every log since the start alive, and a restart after a million
    // deferrals replays them all: seconds before the listeners come up.
    db_opts.set_max_total_wal_size(budget as u64);
    db_opts
}

/// Options of one column family: a memtable of `buffer` bytes and the shared block cache.
fn cf_options(buffer: usize, cache: Option<&rocksdb::Cache>) -> Options {
    let mut opts = Options::default();
    opts.set_write_buffer_size(buffer.max(1 << 20));
    if let Some(cache) = cache {
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(cache);
        opts.set_block_based_table_factory(&table);
    }
    opts
}

/// The suppression list is read once per recipient at injection, nearly always for an
/// address that is not on it: a bloom filter answers those without reading a block.
fn suppression_options(cache: Option<&rocksdb::Cache>) -> Options {
    let mut opts = Options::default();
    opts.set_write_buffer_size(4 << 20);
    let mut table = rocksdb::BlockBasedOptions::default();
    if let Some(cache) = cache {
        table.set_block_cache(cache);
    }
    table.set_bloom_filter(10.0, false);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    opts.set_block_based_table_factory(&table);
    opts
}

/// The Message-ID index forgets entries whose message is older than `retention` as
/// compactions pass over them: its keys are not in time order, so no range deletion can.
fn message_id_options(retention: Duration, cache: Option<&rocksdb::Cache>) -> Options {
    let mut opts = cf_options(4 << 20, cache);
    let retention_ms = retention.as_millis() as u64;
    opts.set_compaction_filter("drover-message-id-retention", move |_level, _key, value| {
        let Some(stamp) = value.get(..6) else {
            return rocksdb::compaction_filter::Decision::Remove;
        };
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(stamp);
        let written = u64::from_be_bytes(ms);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if written.saturating_add(retention_ms) < now {
            rocksdb::compaction_filter::Decision::Remove
        } else {
            rocksdb::compaction_filter::Decision::Keep
        }
    });
    opts
}

/// The index key of a Message-ID: without angle brackets, lowercase.
fn message_id_key(message_id: &str) -> String {
    message_id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_lowercase()
}

fn cf_descriptors(options: &SpoolOptions) -> Vec<ColumnFamilyDescriptor> {
    let budget = options.memory_budget_bytes.max(8 << 20);
    // A cache that cannot be made only costs read speed: RocksDB then uses its own 8 MiB.
    let cache = rocksdb::Cache::new_lru_cache(budget / 8).ok();
    let small = (budget / 16).min(16 << 20);
    let mut body_opts = cf_options(options.body_buffer_bytes.min(budget / 2), cache.as_ref());
    body_opts.set_enable_blob_files(true);
    body_opts.set_min_blob_size(options.min_blob_size);
    body_opts.set_enable_blob_gc(true);
    // One memtable flushing while the next fills, so a flush never stalls injection.
    body_opts.set_max_write_buffer_number(3);
    vec![
        ColumnFamilyDescriptor::new(CF_META, cf_options(small, cache.as_ref())),
        ColumnFamilyDescriptor::new(CF_BODY, body_opts),
        ColumnFamilyDescriptor::new(CF_SCHEDULE, cf_options(small, cache.as_ref())),
        ColumnFamilyDescriptor::new(CF_STATE, cf_options(1 << 20, cache.as_ref())),
        ColumnFamilyDescriptor::new(CF_SUPPRESSION, suppression_options(cache.as_ref())),
        ColumnFamilyDescriptor::new(CF_SENT, cf_options(4 << 20, cache.as_ref())),
        ColumnFamilyDescriptor::new(
            CF_MESSAGE_IDS,
            message_id_options(options.message_id_retention, cache.as_ref()),
        ),
        ColumnFamilyDescriptor::new(CF_GENERATION, cf_options(1 << 20, cache.as_ref())),
    ]
}

fn open_db(path: &Path, options: &SpoolOptions) -> Result<DB, rocksdb::Error> {
    DB::open_cf_descriptors(&db_options(options), path, cf_descriptors(options))
}

fn open_db_read_only(path: &Path, options: &SpoolOptions) -> Result<DB, rocksdb::Error> {
    let mut db_opts = db_options(options);
    db_opts.create_if_missing(false);
    DB::open_cf_descriptors_read_only(&db_opts, path, cf_descriptors(options), false)
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, QueueError> {
    db.cf_handle(name).ok_or_else(|| QueueError::Corrupt {
        id: String::new(),
        reason: format!("column family {name} is missing"),
    })
}

impl Shared {
    /// Runs `f` on the current instance under a read lock. While the writer holds the write
    /// lock to reopen the database (a WAL replay can take seconds), readers fail at once with
    /// [`QueueError::Reopening`] rather than block the thread they run on.
    fn with_db<T>(&self, f: impl FnOnce(&DB) -> Result<T, QueueError>) -> Result<T, QueueError> {
        #[cfg(any(test, feature = "testing"))]
        {
            use std::sync::atomic::Ordering;
            if self
                .failing_reads
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(QueueError::Reopening);
            }
        }
        let guard = match self.db.try_read() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(QueueError::Reopening),
        };
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(QueueError::Unwritable(
                "the spool database could not be reopened".into(),
            )),
        }
    }

    fn read_message(&self, id: &MessageId) -> Read {
        self.with_db(|db| {
            let Some(bytes) = db.get_pinned_cf(cf(db, CF_META)?, id.as_bytes())? else {
                return Ok(None);
            };
            let meta = decode_meta(id, &bytes)?;
            let Some(pinned) = db.get_pinned_cf(cf(db, CF_BODY)?, id.as_bytes())? else {
                return Ok(None);
            };
            let mut body = self
                .buffers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            body.clear();
            body.extend_from_slice(&pinned);
            Ok(Some((meta, body)))
        })
    }
}

/// What a read of a message gives: its metadata and body, or `None` when it is not spooled.
type Read = Result<Option<(MessageMeta, Vec<u8>)>, QueueError>;

/// One read for the reader threads.
struct ReadJob {
    id: MessageId,
    done: oneshot::Sender<Read>,
}

/// Bytes of body buffers kept for reuse, in all.
/// A few megabytes are enough: buffers come back as fast as workers finish with them, and
/// whatever the pool holds stays resident while the engine idles.
pub(crate) const RECYCLED_BYTES: usize = 4 << 20;
/// Largest body buffer kept for reuse; larger ones go back to the allocator.
pub(crate) const RECYCLED_BUFFER_MAX: usize = 1 << 20;

/// Body buffers kept for reuse, at most [`RECYCLED_BYTES`] of capacity in all.
#[derive(Default)]
struct Recycled {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

impl Recycled {
    fn take(&mut self) -> Vec<u8> {
        match self.buffers.pop() {
            Some(buffer) => {
                self.bytes -= buffer.capacity();
                buffer
            }
            None => Vec::new(),
        }
    }

    fn give(&mut self, buffer: Vec<u8>) {
        let capacity = buffer.capacity();
        if capacity <= RECYCLED_BUFFER_MAX && self.bytes + capacity <= RECYCLED_BYTES {
            self.bytes += capacity;
            self.buffers.push(buffer);
        }
    }
}

/// Reader threads of a spool: two, so one read waiting for the disk does not hold up the
/// rest.
const READERS: usize = 2;

/// What the reader threads are asked.
enum ReadMsg {
    Read(ReadJob),
    /// Stop (the spool is closing): a reader holds the database open while it runs.
    Stop,
}

fn reader_loop(shared: Arc<Shared>, jobs: &std::sync::Mutex<mpsc::Receiver<ReadMsg>>) {
    loop {
        // Ends at close, or when every handle (and so every sender) is gone.
        let msg = jobs.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match msg {
            Ok(ReadMsg::Read(job)) => {
                let _ = job.done.send(shared.read_message(&job.id));
            }
            Ok(ReadMsg::Stop) | Err(_) => return,
        }
    }
}

impl Spool {
    /// Opens (or creates) the spool at `path`.
    pub fn open(path: &Path, options: SpoolOptions) -> Result<Spool, QueueError> {
        let db = open_db(path, &options)?;
        let (writable, _) = watch::channel(true);
        let pending = tokio::sync::Semaphore::new(pending_units(&options));
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            options,
            db: RwLock::new(Some(db)),
            writable,
            pending,
            buffers: std::sync::Mutex::new(Recycled::default()),
            message_writes: std::sync::atomic::AtomicU64::new(0),
            #[cfg(any(test, feature = "testing"))]
            failing_reads: std::sync::atomic::AtomicUsize::new(0),
        });
        metrics::gauge!(WRITABLE_GAUGE).set(1.0);
        let (tx, rx) = mpsc::channel();
        let writer = Arc::clone(&shared);
        thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer_loop(writer, &rx))
            .map_err(|e| QueueError::Corrupt {
                id: String::new(),
                reason: format!("cannot start the spool writer: {e}"),
            })?;
        let (reads, jobs) = mpsc::channel();
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        let mut readers = Vec::with_capacity(READERS);
        for i in 0..READERS {
            let (shared, jobs) = (Arc::clone(&shared), Arc::clone(&jobs));
            let reader = thread::Builder::new()
                .name(format!("spool-reader-{i}"))
                .spawn(move || reader_loop(shared, &jobs))
                .map_err(|e| QueueError::Corrupt {
                    id: String::new(),
                    reason: format!("cannot start a spool reader: {e}"),
                })?;
            readers.push(reader);
        }
        Ok(Spool {
            shared,
            tx,
            readers: Arc::new(Readers {
                reads,
                threads: std::sync::Mutex::new(readers),
            }),
        })
    }

    /// Whether the spool accepts writes. False while it is degraded after a storage error
    /// (e.g. a full disk); it turns true again by itself once a reopen succeeds.
    pub fn is_writable(&self) -> bool {
        *self.shared.writable.borrow()
    }

    /// Returns once the spool accepts writes (at once if it does).
    pub async fn wait_writable(&self) {
        let mut rx = self.shared.writable.subscribe();
        // An error means the spool is gone: nothing to wait for.
        let _ = rx.wait_for(|w| *w).await;
    }

    /// Runs `f` on the current instance under a read lock (see [`Shared::with_db`]).
    fn with_db<T>(&self, f: impl FnOnce(&DB) -> Result<T, QueueError>) -> Result<T, QueueError> {
        self.shared.with_db(f)
    }

    /// Gives a body from [`Spool::read_message`] back once it is sent, for the next read to
    /// fill. At most 32 MiB of buffers are kept, none over 1 MiB.
    pub fn recycle(&self, body: Vec<u8>) {
        self.shared
            .buffers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .give(body);
    }

    /// A message's metadata and body, read by the spool's reader threads: a RocksDB read may
    /// wait for the disk, and async code must not. Under load the readers take request after
    /// request without sleeping, so a read costs two channel hand-offs, not the thread
    /// wake-ups of a blocking-pool task per read. `None` when the message is not spooled.
    pub async fn read_message(&self, id: MessageId) -> Read {
        let (done, wait) = oneshot::channel();
        self.readers
            .reads
            .send(ReadMsg::Read(ReadJob { id, done }))
            .map_err(|_| QueueError::Closed)?;
        wait.await.map_err(|_| QueueError::Closed)?
    }

    /// Makes the next `count` reads fail with [`QueueError::Reopening`], as they do while the
    /// database is reopened: for tests of callers' handling of transient read errors.
    #[cfg(any(test, feature = "testing"))]
    pub fn fail_next_reads(&self, count: usize) {
        self.shared
            .failing_reads
            .store(count, std::sync::atomic::Ordering::SeqCst);
    }

    async fn submit(&self, ops: Vec<Op>) -> Result<(), QueueError> {
        self.submit_with(ops, true).await
    }

    async fn submit_with(&self, ops: Vec<Op>, durable: bool) -> Result<(), QueueError> {
        let bytes: usize = ops.iter().map(Op::size).sum();
        let units = (bytes / PENDING_UNIT)
            .clamp(1, pending_units(&self.shared.options))
            .try_into()
            .unwrap_or(u32::MAX);
        // Held until the writer answered: the queue never holds more than the budget (one
        // job larger than the whole budget still goes, alone).
        let _room = self
            .shared
            .pending
            .acquire_many(units)
            .await
            .map_err(|_| QueueError::Closed)?;
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Write(Job { ops, durable, done }))
            .map_err(|_| QueueError::Closed)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Refusal::Failed(reason))) => Err(QueueError::Write(reason)),
            Ok(Err(Refusal::Unwritable(reason))) => Err(QueueError::Unwritable(reason)),
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
    /// delete anyway (the engine's accounting checkpoint covers a lost removal of a finished message). The
    /// write still goes through the same ordered queue, so it is never overtaken.
    pub async fn remove_lazily(&self, id: MessageId, due_ms: u64) -> Result<(), QueueError> {
        self.submit_with(vec![Op::Remove { id, due_ms }], false)
            .await
    }

    /// Deletes many messages as one write, without waiting for a sync (see
    /// [`Spool::remove_lazily`]): `(id, due_ms)` pairs.
    pub async fn remove_many_lazily(
        &self,
        messages: Vec<(MessageId, u64)>,
    ) -> Result<(), QueueError> {
        if messages.is_empty() {
            return Ok(());
        }
        let ops = messages
            .into_iter()
            .map(|(id, due_ms)| Op::Remove { id, due_ms })
            .collect();
        self.submit_with(ops, false).await
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

    /// Puts addresses on the suppression list (or updates their entries); returns once
    /// synced.
    pub async fn suppress(
        &self,
        entries: Vec<(SuppressionKey, Suppression)>,
    ) -> Result<(), QueueError> {
        let ops = entries
            .into_iter()
            .map(|(key, entry)| {
                Ok(Op::Suppress {
                    key: key.to_bytes(),
                    value: serde_json::to_vec(&entry).map_err(|e| QueueError::Corrupt {
                        id: key.address.clone(),
                        reason: format!("suppression entry: {e}"),
                    })?,
                })
            })
            .collect::<Result<Vec<_>, QueueError>>()?;
        self.submit(ops).await
    }

    /// Takes addresses off the suppression list; returns once synced.
    pub async fn unsuppress(&self, keys: Vec<SuppressionKey>) -> Result<(), QueueError> {
        self.submit(
            keys.into_iter()
                .map(|k| Op::Unsuppress { key: k.to_bytes() })
                .collect(),
        )
        .await
    }

    /// The entries of `keys` on the suppression list, in order (`None`: not suppressed).
    /// One batched read; the column family's bloom filter answers most misses from memory.
    pub fn suppressed(
        &self,
        keys: &[SuppressionKey],
    ) -> Result<Vec<Option<Suppression>>, QueueError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.with_db(|db| {
            let handle = cf(db, CF_SUPPRESSION)?;
            let bytes: Vec<Vec<u8>> = keys.iter().map(SuppressionKey::to_bytes).collect();
            db.batched_multi_get_cf(handle, bytes.iter(), false)
                .into_iter()
                .map(|got| match got? {
                    None => Ok(None),
                    // An entry that does not decode still suppresses: better one mail too
                    // few than one to an address that asked for none.
                    Some(v) => Ok(Some(serde_json::from_slice(&v).unwrap_or(Suppression {
                        source: "unknown".into(),
                        reason: String::new(),
                        at_ms: 0,
                        message_id: None,
                    }))),
                })
                .collect()
        })
    }

    /// Up to `limit` entries of `tenant` (every tenant when `None` is `all`), in address
    /// order, after `after` (an address of that tenant): a page of the list.
    pub fn suppressions(
        &self,
        tenant: Option<&str>,
        all: bool,
        after: Option<&SuppressionKey>,
        limit: usize,
    ) -> Result<Vec<(SuppressionKey, Suppression)>, QueueError> {
        self.with_db(|db| {
            let handle = cf(db, CF_SUPPRESSION)?;
            let prefix = if all {
                Vec::new()
            } else {
                SuppressionKey::tenant_prefix(tenant)
            };
            let start = after.map_or_else(|| prefix.clone(), SuppressionKey::to_bytes);
            let mut out = Vec::new();
            let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
            for item in db.iterator_cf(handle, mode) {
                let (k, v) = item?;
                if !k.starts_with(&prefix) || out.len() >= limit {
                    break;
                }
                if after.is_some() && *k == *start {
                    continue;
                }
                let Some(key) = SuppressionKey::from_bytes(&k) else {
                    continue;
                };
                let Ok(entry) = serde_json::from_slice(&v) else {
                    continue;
                };
                out.push((key, entry));
            }
            Ok(out)
        })
    }

    /// Remembers the Message-IDs clients wrote, so a report that returns only the headers can
    /// be tied to its message. Unsynced: a crash loses only the chance to match.
    pub async fn index_message_ids(
        &self,
        entries: Vec<(String, MessageId)>,
    ) -> Result<(), QueueError> {
        let ops = entries
            .into_iter()
            .map(|(message_id, id)| Op::IndexMessageId {
                key: message_id_key(&message_id),
                id,
            })
            .filter(|op| matches!(op, Op::IndexMessageId { key, .. } if !key.is_empty()))
            .collect();
        self.submit_with(ops, false).await
    }

    /// The message a client-written Message-ID belongs to, within the retention.
    pub fn message_id(&self, message_id: &str) -> Result<Option<MessageId>, QueueError> {
        let key = message_id_key(message_id);
        self.with_db(|db| {
            Ok(db
                .get_pinned_cf(cf(db, CF_MESSAGE_IDS)?, key.as_bytes())?
                .and_then(|v| MessageId::from_slice(&v).ok()))
        })
    }

    /// What is remembered of message `id` (see [`Sent`]), while it is queued and for the
    /// retention period after.
    pub fn sent(&self, id: &MessageId) -> Result<Option<Sent>, QueueError> {
        self.with_db(|db| {
            Ok(db
                .get_pinned_cf(cf(db, CF_SENT)?, id.as_bytes())?
                .and_then(|v| serde_json::from_slice(&v).ok()))
        })
    }

    /// Forgets what is remembered of messages received before `before_ms` (their ids are
    /// UUIDv7: the first 48 bits are the reception time, so this is one range deletion).
    pub fn expire_sent(&self, before_ms: u64) -> Result<(), QueueError> {
        let mut bound = [0u8; 16];
        bound[..6].copy_from_slice(&before_ms.to_be_bytes()[2..]);
        self.with_db(|db| {
            let handle = cf(db, CF_SENT)?;
            db.delete_range_cf(handle, [0u8; 16], bound)?;
            Ok(())
        })
    }

    /// The state record stored under `key`, if any.
    pub fn state(&self, key: &str) -> Result<Option<Vec<u8>>, QueueError> {
        self.with_db(|db| Ok(db.get_cf(cf(db, CF_STATE)?, key.as_bytes())?))
    }

    /// Every state record whose key starts with `prefix`.
    pub fn states(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, QueueError> {
        self.with_db(|db| {
            let mut out = Vec::new();
            for item in db.prefix_iterator_cf(cf(db, CF_STATE)?, prefix.as_bytes()) {
                let (k, v) = item?;
                if !k.starts_with(prefix.as_bytes()) {
                    break;
                }
                out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
            }
            Ok(out)
        })
    }

    /// Reads a message's metadata.
    pub fn meta(&self, id: &MessageId) -> Result<Option<MessageMeta>, QueueError> {
        self.with_db(
            |db| match db.get_pinned_cf(cf(db, CF_META)?, id.as_bytes())? {
                None => Ok(None),
                Some(bytes) => decode_meta(id, &bytes).map(Some),
            },
        )
    }

    /// Reads a message's body.
    pub fn body(&self, id: &MessageId) -> Result<Option<Vec<u8>>, QueueError> {
        self.with_db(|db| Ok(db.get_cf(cf(db, CF_BODY)?, id.as_bytes())?))
    }

    /// Ids of messages due at `until_ms` or earlier, earliest first, at most `limit`: the
    /// `schedule` index makes this a range scan, so a restart can start with what is due.
    pub fn due_ids(&self, until_ms: u64, limit: usize) -> Result<Vec<MessageId>, QueueError> {
        self.with_db(|db| {
            let mut out = Vec::new();
            for item in db.iterator_cf(cf(db, CF_SCHEDULE)?, rocksdb::IteratorMode::Start) {
                let (key, _) = item?;
                let Some((due, id)) = key.split_first_chunk::<8>() else {
                    continue;
                };
                if u64::from_be_bytes(*due) > until_ms || out.len() >= limit {
                    break;
                }
                out.push(MessageId::from_slice(id)?);
            }
            Ok(out)
        })
    }

    /// Every stored message's metadata, in id (reception) order. Used to rebuild the schedule
    /// at start-up; a record that does not decode is reported, not skipped silently. Reads in
    /// chunks, each under its own read lock, so a long scan never holds up a reopen.
    pub fn scan(&self) -> impl Iterator<Item = Result<MessageMeta, QueueError>> + '_ {
        let mut after: Option<Vec<u8>> = None;
        let mut chunk: VecDeque<Result<MessageMeta, QueueError>> = VecDeque::new();
        let mut done = false;
        std::iter::from_fn(move || {
            if chunk.is_empty() && !done {
                let read = self.with_db(|db| {
                    let mode = match &after {
                        Some(key) => rocksdb::IteratorMode::From(key, rocksdb::Direction::Forward),
                        None => rocksdb::IteratorMode::Start,
                    };
                    let mut out = Vec::with_capacity(SCAN_CHUNK);
                    for item in db.iterator_cf(cf(db, CF_META)?, mode) {
                        let (key, value) = item?;
                        if after.as_deref() == Some(&key[..]) {
                            continue;
                        }
                        out.push((key.to_vec(), value));
                        if out.len() == SCAN_CHUNK {
                            break;
                        }
                    }
                    Ok(out)
                });
                match read {
                    Ok(items) => {
                        done = items.len() < SCAN_CHUNK;
                        if let Some((key, _)) = items.last() {
                            after = Some(key.clone());
                        }
                        chunk.extend(items.into_iter().map(|(key, value)| {
                            let id = MessageId::from_slice(&key)?;
                            decode_meta(&id, &value)
                        }));
                    }
                    Err(e) => {
                        done = true;
                        chunk.push_back(Err(e));
                    }
                }
            }
            chunk.pop_front()
        })
    }

    /// Writes every memtable to table files and syncs the WAL; used at shutdown, so the next
    /// start has no log to replay. A degraded spool has nothing to flush: its synced writes
    /// are on disk, and its failed instance must not be touched (module header).
    pub fn flush(&self) -> Result<(), QueueError> {
        self.flush_cfs(ALL_CFS, true)
    }

    /// Message inserts, updates and removals written since the spool opened (state writes,
    /// such as the accounting checkpoint, do not count): a caller that sees it standing still
    /// knows the spool is quiet.
    pub fn message_writes(&self) -> u64 {
        self.shared
            .message_writes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Writes the memtables of the message column families out to disk, so the memory they
    /// hold goes back (once a wave of writes is over, nothing else would flush them). Blocks
    /// until done: call it off the async threads.
    pub fn flush_memtables(&self) -> Result<(), QueueError> {
        self.flush_cfs(&[CF_META, CF_BODY, CF_SCHEDULE], false)
    }

    /// Flushes the memtables of `names` (and syncs the WAL with `wal`), unless the spool is
    /// degraded.
    fn flush_cfs(&self, names: &[&str], wal: bool) -> Result<(), QueueError> {
        let guard = self
            .shared
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let (Some(db), true) = (guard.as_ref(), self.is_writable()) {
            for name in names {
                db.flush_cf(cf(db, name)?)?;
            }
            if wal {
                db.flush_wal(true)?;
            }
        }
        Ok(())
    }

    /// Bytes RocksDB holds in memory now: `(memtables, block cache)`.
    pub fn memory_usage(&self) -> Result<(u64, u64), QueueError> {
        self.with_db(|db| {
            let mut memtables = 0;
            let mut cache = 0;
            for name in ALL_CFS {
                let handle = cf(db, name)?;
                memtables += db
                    .property_int_value_cf(handle, "rocksdb.cur-size-all-mem-tables")?
                    .unwrap_or(0);
                // The cache is shared: every column family reports the same one.
                cache = db
                    .property_int_value_cf(handle, "rocksdb.block-cache-usage")?
                    .unwrap_or(0);
            }
            Ok((memtables, cache))
        })
    }

    /// Flushes and stops the writer thread. Later writes fail with [`QueueError::Closed`]; the
    /// database itself closes when the last clone of this handle is dropped.
    pub fn close(&self) -> Result<(), QueueError> {
        let flushed = self.flush();
        let (ack, wait) = mpsc::channel();
        if self.tx.send(Msg::Close(ack)).is_ok() {
            let _ = wait.recv();
        }
        // The readers hold the database open: they are gone before this returns, so dropping
        // the handles closes it.
        self.readers.stop();
        // The flush above may have started a compaction: it must not be left running into the
        // process's exit, where RocksDB's static thread pools are torn down under it.
        if let Some(db) = self
            .shared
            .db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            db.cancel_all_background_work(true);
        }
        flushed
    }
}

fn decode_meta(id: &MessageId, bytes: &[u8]) -> Result<MessageMeta, QueueError> {
    serde_json::from_slice(bytes).map_err(|e| QueueError::Corrupt {
        id: id.to_string(),
        reason: e.to_string(),
    })
}

/// The writer's memory of a storage error, until a reopen succeeds.
struct Degraded {
    cause: String,
    next_probe: Instant,
    backoff: Duration,
    /// Messages of the failed batch: if any reached the disk after all, they are deleted
    /// after the reopen, since their callers were told they failed.
    failed_inserts: Vec<(MessageId, u64)>,
    /// Deferred-generation writes of the failed batch, undone after the reopen for the same
    /// reason (a stored request deleted, a progress marker set back).
    failed_generation: Vec<GenerationUndo>,
}

fn writer_loop(shared: Arc<Shared>, rx: &mpsc::Receiver<Msg>) {
    let mut synced = WriteOptions::default();
    synced.set_sync(shared.options.sync);
    let lazy = WriteOptions::default();
    let mut closing = None;
    let mut degraded: Option<Degraded> = None;
    loop {
        let first = match &degraded {
            None => match rx.recv() {
                Ok(msg) => msg,
                Err(_) => break,
            },
            Some(d) => {
                match rx.recv_timeout(d.next_probe.saturating_duration_since(Instant::now())) {
                    Ok(msg) => msg,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        degraded = try_recover(&shared, degraded.take(), &synced);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        };
        // Everything queued while the last sync ran goes into one batch: the group commit.
        let mut jobs = Vec::new();
        for msg in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match msg {
                Msg::Write(job) => jobs.push(job),
                Msg::Close(ack) => closing = Some(ack),
            }
        }
        if degraded
            .as_ref()
            .is_some_and(|d| d.next_probe <= Instant::now())
        {
            degraded = try_recover(&shared, degraded.take(), &synced);
        }
        if !jobs.is_empty() {
            let result = match &degraded {
                Some(d) => Err(Refusal::Unwritable(d.cause.clone())),
                None => {
                    // Written, then synced as a separate step (the same durability as a
                    // synced write: nobody is answered before both), so the two latencies
                    // can be told apart. One durable job makes the whole batch synced; lazy
                    // ones then ride along.
                    let started = Instant::now();
                    let mut result = write_jobs(&shared, &jobs, &lazy);
                    metrics::histogram!(WRITE_HISTOGRAM).record(started.elapsed().as_secs_f64());
                    if result.is_ok() && shared.options.sync && jobs.iter().any(|j| j.durable) {
                        let syncing = Instant::now();
                        result = sync_wal(&shared);
                        metrics::histogram!(FSYNC_HISTOGRAM)
                            .record(syncing.elapsed().as_secs_f64());
                    }
                    if let Err(e) = &result {
                        tracing::error!(error = %e, "spool write failed; the spool is read-only until it can be reopened");
                        degraded = Some(degrade(&shared, e.clone(), &jobs));
                    }
                    result.map_err(Refusal::Failed)
                }
            };
            for job in jobs {
                let _ = job.done.send(result.clone());
            }
        }
        if closing.is_some() {
            break;
        }
    }
    drop(shared);
    if let Some(ack) = closing {
        let _ = ack.send(());
    }
}

fn degrade(shared: &Shared, cause: String, jobs: &[Job]) -> Degraded {
    shared.writable.send_replace(false);
    metrics::gauge!(WRITABLE_GAUGE).set(0.0);
    let failed_inserts = jobs
        .iter()
        .flat_map(|j| &j.ops)
        .filter_map(|op| match op {
            Op::Insert(meta, _) => Some((meta.id, meta.due_ms)),
            _ => None,
        })
        .collect();
    let failed_generation = jobs
        .iter()
        .flat_map(|j| &j.ops)
        .filter_map(|op| match op {
            Op::Generation(op) => op.undo(),
            _ => None,
        })
        .collect();
    Degraded {
        cause,
        next_probe: Instant::now() + PROBE_INTERVAL,
        backoff: PROBE_INTERVAL,
        failed_inserts,
        failed_generation,
    }
}

/// Bytes of the WAL files, which a reopen replays and flushes.
fn wal_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes available to unprivileged users on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// One probe of a degraded spool: reopens it when the file system seems to have room.
/// Returns the degraded state still in force, or `None` once writable again.
fn try_recover(
    shared: &Shared,
    degraded: Option<Degraded>,
    synced: &WriteOptions,
) -> Option<Degraded> {
    let mut d = degraded?;
    let needed = wal_bytes(&shared.path).saturating_add(REOPEN_HEADROOM);
    if free_bytes(&shared.path).is_some_and(|free| free < needed) {
        d.next_probe = Instant::now() + PROBE_INTERVAL;
        return Some(d);
    }
    let mut slot = shared.db.write().unwrap_or_else(PoisonError::into_inner);
    // The failed instance must be closed (its lock file released) before the new one opens.
    drop(slot.take());
    let db = match open_db(&shared.path, &shared.options) {
        Ok(db) => db,
        Err(e) => {
            *slot = open_db_read_only(&shared.path, &shared.options)
                .map_err(|ro| tracing::error!(error = %ro, "the spool cannot even be read"))
                .ok();
            d.backoff = (d.backoff * 2).min(MAX_REOPEN_BACKOFF);
            d.next_probe = Instant::now() + d.backoff;
            tracing::warn!(error = %e, retry_in = ?d.backoff, "reopening the spool failed");
            return Some(d);
        }
    };
    if let Err(e) = undo_failed_inserts(&db, &d.failed_inserts, &d.failed_generation, synced) {
        // Writes fail again already: stay degraded and keep the list for the next attempt.
        *slot = Some(db);
        d.cause = e;
        d.next_probe = Instant::now() + PROBE_INTERVAL;
        return Some(d);
    }
    *slot = Some(db);
    drop(slot);
    shared.writable.send_replace(true);
    metrics::gauge!(WRITABLE_GAUGE).set(1.0);
    tracing::info!(cause = %d.cause, "the spool is writable again");
    None
}

fn undo_failed_inserts(
    db: &DB,
    inserts: &[(MessageId, u64)],
    generation: &[GenerationUndo],
    synced: &WriteOptions,
) -> Result<(), String> {
    let cf = |name| cf(db, name).map_err(|e| e.to_string());
    let (meta_cf, body_cf, sched_cf) = (cf(CF_META)?, cf(CF_BODY)?, cf(CF_SCHEDULE)?);
    let mut batch = WriteBatch::default();
    for (id, due_ms) in inserts {
        if db
            .get_pinned_cf(meta_cf, id.as_bytes())
            .map_err(|e| e.to_string())?
            .is_some()
        {
            tracing::warn!(%id, "removing a message whose failed insert reached the disk");
            batch.delete_cf(meta_cf, id.as_bytes());
            batch.delete_cf(body_cf, id.as_bytes());
            batch.delete_cf(sched_cf, schedule_key(*due_ms, id));
        }
    }
    if !generation.is_empty() {
        let generation_cf = cf(CF_GENERATION)?;
        for undo in generation {
            undo.apply(&mut batch, generation_cf);
        }
    }
    if batch.is_empty() {
        return Ok(());
    }
    db.write_opt(batch, synced).map_err(|e| e.to_string())
}

/// Syncs the write-ahead log: what was written before is on disk once this returns.
fn sync_wal(shared: &Shared) -> Result<(), String> {
    let guard = shared.db.read().unwrap_or_else(PoisonError::into_inner);
    let db = guard
        .as_ref()
        .ok_or_else(|| "the spool database is not open".to_owned())?;
    db.flush_wal(true).map_err(|e| e.to_string())
}

fn write_jobs(shared: &Shared, jobs: &[Job], write_opts: &WriteOptions) -> Result<(), String> {
    let guard = shared.db.read().unwrap_or_else(PoisonError::into_inner);
    let db = guard
        .as_ref()
        .ok_or_else(|| "the spool database is not open".to_owned())?;
    let cf = |name| cf(db, name).map_err(|e| e.to_string());
    let (meta_cf, body_cf, sched_cf, state_cf) =
        (cf(CF_META)?, cf(CF_BODY)?, cf(CF_SCHEDULE)?, cf(CF_STATE)?);
    let mut batch = WriteBatch::default();
    for job in jobs {
        if batch.size_in_bytes() >= MAX_BATCH_BYTES {
            // Unsynced: the sync after the final write covers it, as the WAL is written in
            // order. No caller is answered before that sync, and a job is never split, so
            // each job stays all-or-nothing.
            let full = std::mem::take(&mut batch);
            db.write_opt(full, &WriteOptions::default())
                .map_err(|e| e.to_string())?;
        }
        for op in &job.ops {
            if matches!(op, Op::Insert(..) | Op::Update { .. } | Op::Remove { .. }) {
                shared
                    .message_writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            match op {
                Op::Insert(meta, body) => {
                    let value = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
                    batch.put_cf(meta_cf, meta.id.as_bytes(), value);
                    batch.put_cf(body_cf, meta.id.as_bytes(), body);
                    batch.put_cf(sched_cf, schedule_key(meta.due_ms, &meta.id), b"");
                    let sent = Sent {
                        recipient: meta.recipient.clone(),
                        tenant: meta.tenant.clone(),
                        campaign: meta.campaign.clone(),
                        metadata: meta.metadata.clone(),
                    };
                    let sent = serde_json::to_vec(&sent).map_err(|e| e.to_string())?;
                    batch.put_cf(cf(CF_SENT)?, meta.id.as_bytes(), sent);
                }
                Op::Update {
                    meta,
                    previous_due_ms,
                } => {
                    let value = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
                    batch.put_cf(meta_cf, meta.id.as_bytes(), value);
                    // Unchanged due time: the index entry stands.
                    if *previous_due_ms != meta.due_ms {
                        batch.delete_cf(sched_cf, schedule_key(*previous_due_ms, &meta.id));
                        batch.put_cf(sched_cf, schedule_key(meta.due_ms, &meta.id), b"");
                    }
                }
                Op::Remove { id, due_ms } => {
                    batch.delete_cf(meta_cf, id.as_bytes());
                    batch.delete_cf(body_cf, id.as_bytes());
                    batch.delete_cf(sched_cf, schedule_key(*due_ms, id));
                }
                Op::PutState { key, value } => batch.put_cf(state_cf, key.as_bytes(), value),
                Op::DeleteState { key } => batch.delete_cf(state_cf, key.as_bytes()),
                Op::Suppress { key, value } => batch.put_cf(cf(CF_SUPPRESSION)?, key, value),
                Op::Unsuppress { key } => batch.delete_cf(cf(CF_SUPPRESSION)?, key),
                Op::IndexMessageId { key, id } => {
                    batch.put_cf(cf(CF_MESSAGE_IDS)?, key.as_bytes(), id.as_bytes())
                }
                Op::Generation(op) => op.write(&mut batch, cf(CF_GENERATION)?),
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
        self.with_db(|db| {
            Ok(db
                .iterator_cf(cf(db, CF_SCHEDULE)?, rocksdb::IteratorMode::Start)
                .filter_map(Result::ok)
                .map(|(k, _)| k.to_vec())
                .collect())
        })
        .unwrap_or_default()
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
            priority: Default::default(),
            metadata: None,
            arrived_ms: None,
            size: 5,
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
        let keys = spool.schedule_keys();
        assert_eq!(keys, vec![schedule_key(99, &a.id).to_vec()]);
    }

    #[tokio::test]
    async fn the_suppression_list_is_durable_per_tenant_and_pages() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |source: &str| Suppression {
            source: source.into(),
            reason: "bad-mailbox".into(),
            at_ms: 7,
            message_id: None,
        };
        {
            let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            let mut entries: Vec<_> = (0..250)
                .map(|i| {
                    (
                        SuppressionKey::new(Some("acme"), &format!("u{i:03}@x.test")),
                        entry("bounce"),
                    )
                })
                .collect();
            entries.push((SuppressionKey::new(None, "U001@X.test"), entry("admin")));
            entries.push((
                SuppressionKey::new(Some("beta"), "u001@x.test"),
                entry("complaint"),
            ));
            spool.suppress(entries).await.unwrap();
            assert_eq!(spool.message_writes(), 0, "not message writes");
            spool.close().unwrap();
        }
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let got = spool
            .suppressed(&[
                SuppressionKey::new(Some("acme"), "U001@x.TEST"),
                SuppressionKey::new(Some("acme"), "nobody@x.test"),
                SuppressionKey::new(None, "u001@x.test"),
                SuppressionKey::new(Some("gamma"), "u001@x.test"),
            ])
            .unwrap();
        assert_eq!(got[0].as_ref().map(|s| s.source.as_str()), Some("bounce"));
        assert!(got[1].is_none());
        assert_eq!(got[2].as_ref().map(|s| s.source.as_str()), Some("admin"));
        assert!(got[3].is_none(), "another tenant's list");
        // Pages of one tenant, in address order, resuming after the last one seen.
        let first = spool.suppressions(Some("acme"), false, None, 100).unwrap();
        assert_eq!(first.len(), 100);
        assert_eq!(first[0].0.address, "u000@x.test");
        let second = spool
            .suppressions(Some("acme"), false, Some(&first[99].0), 1_000)
            .unwrap();
        assert_eq!(second.len(), 150);
        assert_eq!(second[0].0.address, "u100@x.test");
        assert_eq!(spool.suppressions(None, false, None, 10).unwrap().len(), 1);
        assert_eq!(
            spool.suppressions(None, true, None, 1_000).unwrap().len(),
            252
        );
        spool
            .unsuppress(vec![SuppressionKey::new(Some("acme"), "u001@x.test")])
            .await
            .unwrap();
        assert!(spool
            .suppressed(&[SuppressionKey::new(Some("acme"), "u001@x.test")])
            .unwrap()[0]
            .is_none());
    }

    #[tokio::test]
    async fn messages_are_remembered_after_removal_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let mut m = meta("jane@example.test", 10);
        m.tenant = Some("acme".into());
        spool
            .insert(vec![(m.clone(), b"x".to_vec())])
            .await
            .unwrap();
        spool.remove(m.id, 10).await.unwrap();
        let sent = spool.sent(&m.id).unwrap().unwrap();
        assert_eq!(sent.recipient, "jane@example.test");
        assert_eq!(sent.tenant.as_deref(), Some("acme"));
        assert_eq!(sent.campaign.as_deref(), Some("c"));
        // Ids are UUIDv7: a bound before this message's time keeps it, one after drops it.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        spool.expire_sent(now - 60_000).unwrap();
        assert!(spool.sent(&m.id).unwrap().is_some());
        spool.expire_sent(now + 60_000).unwrap();
        assert!(spool.sent(&m.id).unwrap().is_none());
    }

    #[tokio::test]
    async fn client_message_ids_find_their_message() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let id = MessageId::generate();
        spool
            .index_message_ids(vec![
                ("<Campaign-7.ABC@News.Example.com>".into(), id),
                ("  ".into(), MessageId::generate()),
            ])
            .await
            .unwrap();
        assert_eq!(
            spool.message_id("campaign-7.abc@news.example.com").unwrap(),
            Some(id)
        );
        assert_eq!(spool.message_id("<other@news.example.com>").unwrap(), None);
    }

    #[tokio::test]
    async fn the_message_id_index_forgets_entries_past_their_retention() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions {
            message_id_retention: Duration::from_millis(1),
            ..SpoolOptions::default()
        };
        let spool = Spool::open(dir.path(), options).unwrap();
        let id = MessageId::generate();
        spool
            .index_message_ids(vec![("<old@x.test>".into(), id)])
            .await
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        spool
            .with_db(|db| {
                let handle = cf(db, CF_MESSAGE_IDS)?;
                db.flush_cf(handle)?;
                db.compact_range_cf(handle, None::<&[u8]>, None::<&[u8]>);
                Ok(())
            })
            .unwrap();
        assert_eq!(spool.message_id("<old@x.test>").unwrap(), None);
    }

    #[tokio::test]
    async fn a_quiet_spool_gives_its_memtables_back() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let metas: Vec<MessageMeta> = (0..2_000)
            .map(|i| meta(&format!("r{i}@example.test"), 10))
            .collect();
        spool
            .insert(metas.iter().map(|m| (m.clone(), vec![b'x'; 512])).collect())
            .await
            .unwrap();
        assert_eq!(spool.message_writes(), 2_000);
        // State writes (the accounting checkpoint) do not count as activity.
        spool.put_state("k", b"v".to_vec()).await.unwrap();
        assert_eq!(spool.message_writes(), 2_000);
        let (before, _) = spool.memory_usage().unwrap();
        assert!(before > 500_000, "{before}");
        spool.flush_memtables().unwrap();
        let (after, _) = spool.memory_usage().unwrap();
        assert!(after < before / 4, "{before} -> {after}");
        // Nothing was lost by the flush.
        assert_eq!(spool.scan().count(), 2_000);
    }

    #[tokio::test]
    async fn reads_fail_fast_while_the_database_is_being_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let a = meta("a@example.test", 10);
        spool
            .insert(vec![(a.clone(), b"x".to_vec())])
            .await
            .unwrap();
        // The writer holds the write lock for the whole WAL replay of a reopen.
        let reopening = spool.shared.db.write().unwrap();
        let started = Instant::now();
        assert!(matches!(spool.meta(&a.id), Err(QueueError::Reopening)));
        assert!(matches!(spool.body(&a.id), Err(QueueError::Reopening)));
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(QueueError::Reopening.is_transient());
        drop(reopening);
        assert_eq!(spool.meta(&a.id).unwrap().unwrap().id, a.id);
        spool.fail_next_reads(1);
        assert!(spool.body(&a.id).is_err());
        assert!(spool.body(&a.id).unwrap().is_some());
        spool.close().unwrap();
    }

    #[tokio::test]
    async fn the_reader_threads_read_messages_from_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let small = meta("a@example.test", 10);
        let big = meta("b@example.test", 10);
        spool
            .insert(vec![
                (small.clone(), b"hello".to_vec()),
                (big.clone(), vec![b'x'; 10_000]),
            ])
            .await
            .unwrap();
        let (m, body) = spool.read_message(small.id).await.unwrap().unwrap();
        assert_eq!((m.id, body.as_slice()), (small.id, &b"hello"[..]));
        // A recycled buffer is filled again, with nothing of its old content.
        spool.recycle(vec![b'z'; 64]);
        let (_, again) = spool.read_message(small.id).await.unwrap().unwrap();
        assert_eq!(again, b"hello");
        assert!(again.capacity() >= 64, "the recycled buffer was used");
        // Flushed, the large body lives in a blob file.
        spool.flush().unwrap();
        let reads: Vec<_> = (0..100).map(|_| spool.read_message(big.id)).collect();
        for read in reads {
            assert_eq!(read.await.unwrap().unwrap().1.len(), 10_000);
        }
        assert!(spool
            .read_message(MessageId::generate())
            .await
            .unwrap()
            .is_none());
        spool.fail_next_reads(1);
        assert!(matches!(
            spool.read_message(small.id).await,
            Err(QueueError::Reopening)
        ));
        spool.close().unwrap();
    }

    #[tokio::test]
    async fn many_removals_are_one_write_and_big_jobs_pass_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions {
            max_pending_write_bytes: 1 << 20,
            ..SpoolOptions::default()
        };
        let spool = Spool::open(dir.path(), options).unwrap();
        let all: Vec<MessageMeta> = (0..1000)
            .map(|i| meta(&format!("u{i}@example.test"), i))
            .collect();
        let free = spool.shared.pending.available_permits();
        assert_eq!(free, (1 << 20) / PENDING_UNIT);
        // One request larger than the whole pending-write budget still goes through, alone.
        let big = vec![0u8; 2048];
        spool
            .insert(all.iter().map(|m| (m.clone(), big.clone())).collect())
            .await
            .unwrap();
        assert_eq!(spool.shared.pending.available_permits(), free);
        spool
            .remove_many_lazily(all[..600].iter().map(|m| (m.id, m.due_ms)).collect())
            .await
            .unwrap();
        spool.flush().unwrap();
        let left: Vec<_> = spool.scan().collect::<Result<_, _>>().unwrap();
        assert_eq!(left.len(), 400);
        assert_eq!(spool.schedule_keys().len(), 400);
        assert_eq!(spool.shared.pending.available_permits(), free);
        spool.close().unwrap();
    }

    #[tokio::test]
    async fn due_ids_come_from_the_schedule_index_in_due_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let (a, b, c) = (
            meta("a@x.test", 30),
            meta("b@x.test", 10),
            meta("c@x.test", 99),
        );
        spool
            .insert(vec![
                (a.clone(), b"a".to_vec()),
                (b.clone(), b"b".to_vec()),
                (c.clone(), b"c".to_vec()),
            ])
            .await
            .unwrap();
        assert_eq!(spool.due_ids(50, 10).unwrap(), vec![b.id, a.id]);
        assert_eq!(spool.due_ids(50, 1).unwrap(), vec![b.id]);
        assert!(spool.due_ids(5, 10).unwrap().is_empty());
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commits_larger_than_one_batch_are_all_stored() {
        // 24 concurrent requests of 4 messages of 256 KiB: group commits well above
        // MAX_BATCH_BYTES, written as several batches behind one sync.
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Vec::new();
        {
            let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
            let mut tasks = Vec::new();
            for i in 0..24u8 {
                let spool = spool.clone();
                let messages: Vec<_> = (0..4u64)
                    .map(|j| {
                        (
                            meta(&format!("r{i}-{j}@example.test"), j),
                            vec![i; 256 << 10],
                        )
                    })
                    .collect();
                ids.extend(messages.iter().map(|(m, _)| (m.id, i)));
                tasks.push(tokio::spawn(async move { spool.insert(messages).await }));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            spool.close().unwrap();
        }
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        assert_eq!(spool.scan().count(), ids.len());
        for (id, fill) in ids {
            let body = spool.body(&id).unwrap().unwrap();
            assert_eq!(body.len(), 256 << 10);
            assert!(body.iter().all(|b| *b == fill));
        }
    }
}

#[cfg(test)]
mod full_disk_tests {
    use super::*;
    use crate::testing::SmallDisk;
    use std::collections::BTreeMap;

    fn meta(n: u32) -> MessageMeta {
        MessageMeta {
            id: MessageId::generate(),
            sender: "s@example.com".into(),
            recipient: format!("r{n}@example.test"),
            domain: "example.test".into(),
            campaign: None,
            tenant: None,
            received_ms: 1,
            due_ms: u64::from(n),
            attempts: 0,
            headers: BTreeMap::new(),
            last_source: None,
            priority: Default::default(),
            metadata: None,
            arrived_ms: None,
            size: 200_000,
        }
    }

    #[tokio::test]
    async fn a_full_disk_degrades_the_spool_and_freeing_space_recovers_it() {
        let Some(disk) = SmallDisk::mount("16m") else {
            eprintln!("skipping: cannot mount a tmpfs (needs root)");
            return;
        };
        let ballast = disk.path().join("ballast");
        std::fs::write(&ballast, vec![0u8; 9 << 20]).unwrap();
        let path = disk.path().join("spool");
        let spool = Spool::open(&path, SpoolOptions::default()).unwrap();
        let mut stored = Vec::new();
        let failed = loop {
            let m = meta(stored.len() as u32);
            match spool.insert(vec![(m.clone(), vec![b'x'; 200_000])]).await {
                Ok(()) => stored.push(m),
                Err(e) => break (m, e),
            }
            assert!(stored.len() < 200, "the disk never filled up");
        };
        assert!(matches!(failed.1, QueueError::Write(_)), "{:?}", failed.1);
        assert!(!stored.is_empty());
        assert!(!spool.is_writable());
        // Later writes are refused at once, and reads go on.
        let again = spool.insert(vec![(meta(999), b"small".to_vec())]).await;
        assert!(matches!(again, Err(QueueError::Unwritable(_))), "{again:?}");
        assert!(spool.remove(stored[0].id, stored[0].due_ms).await.is_err());
        assert_eq!(spool.meta(&stored[0].id).unwrap().unwrap(), stored[0]);
        assert_eq!(spool.scan().count(), stored.len());
        // Still full: the probes do not reopen, nothing changes.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!spool.is_writable());

        std::fs::remove_file(&ballast).unwrap();
        tokio::time::timeout(Duration::from_secs(10), spool.wait_writable())
            .await
            .expect("the spool recovers once space returns");
        let late = meta(1000);
        spool
            .insert(vec![(late.clone(), b"after".to_vec())])
            .await
            .unwrap();
        stored.push(late);
        let check = |spool: &Spool| {
            for m in &stored {
                assert_eq!(spool.meta(&m.id).unwrap().as_ref(), Some(m));
                assert!(spool.body(&m.id).unwrap().is_some());
            }
            assert!(spool.meta(&failed.0.id).unwrap().is_none());
            assert_eq!(spool.scan().count(), stored.len());
            assert_eq!(spool.schedule_keys().len(), stored.len());
        };
        check(&spool);
        spool.close().unwrap();
        drop(spool);
        let spool = Spool::open(&path, SpoolOptions::default()).unwrap();
        check(&spool);
        drop(spool);
        drop(disk);
    }

    #[tokio::test]
    async fn scans_span_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let all: Vec<_> = (0..(SCAN_CHUNK as u32 * 2 + 7)).map(meta).collect();
        spool
            .insert(all.iter().map(|m| (m.clone(), b"b".to_vec())).collect())
            .await
            .unwrap();
        let scanned: Vec<MessageId> = spool.scan().map(|m| m.unwrap().id).collect();
        let mut ids: Vec<MessageId> = all.iter().map(|m| m.id).collect();
        ids.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        assert_eq!(scanned, ids);
    }
}
