//! The group-committing JSON Lines writer.

use crate::segments::{self, now_secs, Layout, Manifest};
use crate::{BounceCategory, CsvFormat, Position, Record, RecordType};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Errors of the accounting writer.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AccountingError {
    /// The file could not be opened, written or synced.
    #[error("accounting file {path}: {source}")]
    Io {
        /// The accounting file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A segment that records are owed from cannot be found: it was moved out of the
    /// directory or deleted (see the manifest beside the log).
    #[error("accounting segment {segment} is missing (looked for {expected} and where it was seen last); put it back there, or create an empty file of that name to accept that its records are lost")]
    MissingSegment {
        /// The segment's sequence number.
        segment: u64,
        /// Where Drover looks for it first.
        expected: PathBuf,
    },
    /// A stored position lies past the end of its segment (the file was truncated or
    /// replaced while Drover was stopped).
    #[error("accounting position {position} is past the end of its segment ({len} bytes): the file was truncated or replaced")]
    PastEnd {
        /// The position.
        position: Position,
        /// The segment's length.
        len: u64,
    },
    /// The writer thread has stopped (after an earlier I/O error or at shutdown).
    #[error("the accounting writer has stopped")]
    Stopped,
    /// A bounce classification rule file is not valid TOML or has no rules.
    #[error("bounce classification rules: {reason}")]
    RuleFile {
        /// What is wrong with the file as a whole.
        reason: String,
    },
    /// One `[[rule]]` of a bounce classification rule file is wrong.
    #[error("bounce classification rule {number}: {reason}")]
    Rule {
        /// The rule's position in the file, counted from 1.
        number: usize,
        /// What is wrong with it (the bad key, category, code or regex).
        reason: String,
    },
}

enum Job {
    Records {
        /// Serialised by the caller, so the writer thread only writes and syncs.
        lines: Vec<String>,
        counted: Vec<(RecordType, Option<BounceCategory>)>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// A clean stop: the current segment's length goes into the manifest.
    Close { done: oneshot::Sender<()> },
}

/// Bytes of records queued for the writer thread and not yet synced. Callers beyond it wait
/// for room (back-pressure) rather than letting the queue grow while a sync is slow.
pub(crate) const MAX_PENDING_BYTES: usize = 64 << 20;
/// The unit of [`MAX_PENDING_BYTES`] accounting (semaphore permits are u32).
const PENDING_UNIT: usize = 1024;

/// When the current segment is closed and what happens to closed ones.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// Close the current segment once it is at least this long (bytes).
    pub size: u64,
    /// ... or once it is this old and not empty.
    pub age: Option<Duration>,
    /// Compress closed segments to `<path>.<n>.zst`.
    pub compress: bool,
}

impl Default for Rotation {
    fn default() -> Self {
        Rotation {
            size: 1 << 30,
            age: Some(Duration::from_secs(86_400)),
            compress: false,
        }
    }
}

/// What the writer thread and the readers share.
pub(crate) struct Shared {
    pub(crate) layout: Layout,
    /// The end of what is on disk; records appended later start at or after it.
    pub(crate) synced: watch::Sender<Position>,
    /// The manifest in force. The writer holds it while it rotates, so a reader that
    /// locates and opens a segment under it never opens the next segment's file instead.
    pub(crate) manifest: Mutex<Manifest>,
}

impl Shared {
    pub(crate) fn manifest(&self) -> std::sync::MutexGuard<'_, Manifest> {
        self.manifest.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle to the accounting log; cheap to clone.
#[derive(Clone)]
pub struct Accounting {
    tx: mpsc::Sender<Job>,
    pub(crate) shared: Arc<Shared>,
    /// Room in the writer's queue, in [`PENDING_UNIT`]s.
    pending: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounting")
            .field("path", &self.shared.layout.path)
            .finish()
    }
}

impl Accounting {
    /// Opens the log at `path` with the default rotation (1 GiB or a day).
    pub fn open(path: &Path) -> Result<Accounting, AccountingError> {
        Accounting::open_with(path, Rotation::default())
    }

    /// Opens (creating parents and the file) the log whose current segment is `path`,
    /// adopting what an outside tool did to it while Drover was stopped, and starts the
    /// writer thread.
    pub fn open_with(path: &Path, rotation: Rotation) -> Result<Accounting, AccountingError> {
        Accounting::open_full(path, rotation, None)
    }

    /// As [`Accounting::open_with`], also writing every record as a CSV line (`csv`) to
    /// `acct.csv` beside the log, rotated with it as `acct-<sequence>.csv[.zst]` and synced in
    /// the same group commit.
    pub fn open_full(
        path: &Path,
        rotation: Rotation,
        csv: Option<CsvFormat>,
    ) -> Result<Accounting, AccountingError> {
        let io = |source| AccountingError::Io {
            path: path.to_owned(),
            source,
        };
        let layout = Layout::new(path);
        let opened = segments::open(&layout).map_err(io)?;
        drop_torn_tail(path).map_err(io)?;
        let len = opened.file.metadata().map_err(io)?.len();
        let segment = opened.manifest.current;
        let shared = Arc::new(Shared {
            layout,
            synced: watch::Sender::new(Position::new(segment, len)),
            manifest: Mutex::new(opened.manifest),
        });
        let csv = match csv {
            Some(format) => Some(CsvOut::open(&shared.layout, format).map_err(io)?),
            None => None,
        };
        let compressor = if rotation.compress {
            Some(spawn_compressor(Arc::clone(&shared)).map_err(io)?)
        } else {
            None
        };
        let (tx, rx) = mpsc::channel();
        let log = Log {
            shared: Arc::clone(&shared),
            file: opened.file,
            buf: Vec::new(),
            written: len,
            rotation,
            compressor,
            csv,
        };
        thread::Builder::new()
            .name("accounting".into())
            .spawn(move || writer_loop(log, rx))
            .map_err(io)?;
        Ok(Accounting {
            tx,
            shared,
            pending: Arc::new(tokio::sync::Semaphore::new(
                MAX_PENDING_BYTES / PENDING_UNIT,
            )),
        })
    }

    /// Bytes of records handed to the writer thread and not yet synced (in units of 1 KiB,
    /// a batch counting at least one): how far the disk is behind the callers.
    pub fn pending_bytes(&self) -> u64 {
        let all = MAX_PENDING_BYTES / PENDING_UNIT;
        (all.saturating_sub(self.pending.available_permits()) * PENDING_UNIT) as u64
    }

    /// The end of what is on disk. Records appended from now on start at or after it.
    pub fn synced_position(&self) -> Position {
        *self.shared.synced.borrow()
    }

    /// Serialises a record as the one JSON line it will be written as (without the newline).
    pub fn to_line(record: &Record) -> String {
        // Serialising plain data with string keys cannot fail.
        serde_json::to_string(record).unwrap_or_default()
    }

    /// Appends already-serialised records (see [`Accounting::to_line`]); returns once synced.
    pub async fn record_lines(&self, lines: Vec<String>) -> Result<(), AccountingError> {
        self.submit(lines, Vec::new()).await
    }

    /// Appends records serialised beforehand (`lines[i]` is `records[i]` as
    /// [`Accounting::to_line`] made it), counting them in the metrics; returns once synced.
    /// Saves a second serialisation where the caller needed the lines anyway.
    pub async fn record_serialised(
        &self,
        records: &[Record],
        lines: Vec<String>,
    ) -> Result<(), AccountingError> {
        let counted = records
            .iter()
            .map(|r| (r.kind, r.bounce_category))
            .collect();
        self.submit(lines, counted).await
    }

    /// The current segment: records go there, the closed ones sit beside it.
    pub fn path(&self) -> &Path {
        &self.shared.layout.path
    }

    /// Appends one record; returns once it is synced to disk.
    pub async fn record(&self, record: Record) -> Result<(), AccountingError> {
        self.record_all(vec![record]).await
    }

    /// Appends records in order; returns once all are synced to disk.
    pub async fn record_all(&self, records: Vec<Record>) -> Result<(), AccountingError> {
        let lines = records.iter().map(Accounting::to_line).collect();
        let counted = records
            .iter()
            .map(|r| (r.kind, r.bounce_category))
            .collect();
        self.submit(lines, counted).await
    }

    /// A clean stop: after everything queued before it is written, notes the current
    /// segment's length, so that losing the file while Drover is stopped loses nothing owed.
    /// Records may still be written afterwards (the note is then dropped at the next open).
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Job::Close { done }).is_ok() {
            let _ = wait.await;
        }
    }

    async fn submit(
        &self,
        lines: Vec<String>,
        counted: Vec<(RecordType, Option<BounceCategory>)>,
    ) -> Result<(), AccountingError> {
        if lines.is_empty() {
            return Ok(());
        }
        let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
        let units = (bytes / PENDING_UNIT)
            .clamp(1, MAX_PENDING_BYTES / PENDING_UNIT)
            .try_into()
            .unwrap_or(u32::MAX);
        // Held until the writer answered; a batch larger than the whole budget goes alone.
        let _room = self
            .pending
            .acquire_many(units)
            .await
            .map_err(|_| AccountingError::Stopped)?;
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job::Records {
                lines,
                counted,
                done,
            })
            .map_err(|_| AccountingError::Stopped)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(AccountingError::Io {
                path: self.shared.layout.path.clone(),
                source: std::io::Error::other(message),
            }),
            Err(_) => Err(AccountingError::Stopped),
        }
    }
}

/// A crash in the middle of a write can leave a last line without its newline. Its batch was
/// never acknowledged (answers come after the sync), so the line is cut off rather than left
/// for the next record to be glued onto.
fn drop_torn_tail(path: &Path) -> std::io::Result<()> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        std::io::Read::read_exact(&mut file, buf)?;
        if let Some(i) = buf.iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                tracing::warn!(path = %path.display(), bytes = len - keep, "cutting a torn last record");
                file.set_len(keep)?;
                file.sync_data()?;
            }
            return Ok(());
        }
        end = start;
    }
    // No newline at all: a single torn line.
    file.set_len(0)?;
    file.sync_data()
}

/// The writer thread's side of the log.
struct Log {
    shared: Arc<Shared>,
    /// The current segment, opened for appending.
    file: File,
    /// A batch's bytes, written with one call.
    buf: Vec<u8>,
    /// Bytes of the current segment on disk (synced).
    written: u64,
    rotation: Rotation,
    compressor: Option<mpsc::Sender<u64>>,
    /// The CSV copy of every record, when configured.
    csv: Option<CsvOut>,
}

/// The CSV side of the log: `acct.csv` beside it, closed with each segment as
/// `acct-<sequence>.csv`. A view of the same records, written and synced with them.
struct CsvOut {
    format: CsvFormat,
    path: PathBuf,
    file: File,
    written: u64,
    buf: Vec<u8>,
}

impl CsvOut {
    fn open(layout: &Layout, format: CsvFormat) -> std::io::Result<CsvOut> {
        let path = layout.csv_path();
        let file = segments::open_append(&path)?;
        drop_torn_tail(&path)?;
        let written = file.metadata()?.len();
        let mut out = CsvOut {
            format,
            path,
            file,
            written,
            buf: Vec::new(),
        };
        out.header_if_new()?;
        Ok(out)
    }

    /// A new (or emptied) file starts with the header line.
    fn header_if_new(&mut self) -> std::io::Result<()> {
        if self.written == 0 {
            let header = format!("{}\r\n", self.format.header());
            self.file.write_all(header.as_bytes())?;
            self.file.sync_data()?;
            self.written = header.len() as u64;
        }
        Ok(())
    }

    /// Reopens the file if another program renamed or truncated it.
    fn follow_outside_rotation(&mut self) -> std::io::Result<()> {
        let ours = self.file.metadata()?;
        let renamed = !std::fs::metadata(&self.path)
            .is_ok_and(|m| m.ino() == ours.ino() && m.dev() == ours.dev());
        if renamed {
            self.file = segments::open_append(&self.path)?;
            self.written = self.file.metadata()?.len();
        } else if ours.len() < self.written {
            self.written = ours.len();
        }
        self.header_if_new()
    }

    fn rotate(&mut self, layout: &Layout, closed: u64) -> std::io::Result<()> {
        std::fs::rename(&self.path, layout.closed_csv_path(closed))?;
        self.file = segments::open_append(&self.path)?;
        self.written = 0;
        self.header_if_new()
    }

    fn write(&mut self, batch: &Batch) -> std::io::Result<()> {
        self.buf.clear();
        for (lines, _, _) in batch {
            for line in lines {
                if let Some(csv) = self.format.line(line) {
                    self.buf.extend_from_slice(csv.as_bytes());
                    self.buf.extend_from_slice(b"\r\n");
                }
            }
        }
        self.file.write_all(&self.buf)?;
        self.file.sync_data()?;
        self.written += self.buf.len() as u64;
        if self.buf.capacity() > MAX_KEPT_BUFFER {
            self.buf = Vec::new();
        }
        Ok(())
    }

    fn discard_failed(&mut self) {
        let on_disk = self.file.metadata().map_or(self.written, |m| m.len());
        let keep = self.written.min(on_disk);
        if self
            .file
            .set_len(keep)
            .and_then(|()| self.file.sync_data())
            .is_ok()
        {
            self.written = keep;
        }
    }
}

impl Log {
    fn path(&self) -> &Path {
        &self.shared.layout.path
    }

    fn segment(&self) -> u64 {
        self.shared.manifest().current
    }

    fn publish(&self) {
        let position = Position::new(self.segment(), self.written);
        self.shared.synced.send_replace(position);
    }

    /// Before a batch: has another program renamed or truncated the current file? Then the
    /// records so far stay where they went (recorded in the manifest) and a new segment starts,
    /// so no offset ever points into a file other than the one it was taken in.
    fn follow_outside_rotation(&mut self) -> std::io::Result<()> {
        let ours = self.file.metadata()?;
        let at_path = std::fs::metadata(self.path()).ok();
        let renamed = !at_path.is_some_and(|m| m.ino() == ours.ino() && m.dev() == ours.dev());
        let truncated = ours.len() < self.written;
        if !renamed && !truncated {
            return Ok(());
        }
        let layout = self.shared.layout.clone();
        let mut manifest = self.shared.manifest();
        let old = manifest.current;
        if renamed {
            segments::close_moved(&layout, &mut manifest)?;
            let file = segments::open_append(&layout.path)?;
            let meta = file.metadata()?;
            manifest.inode = meta.ino();
            manifest.device = meta.dev();
            self.written = meta.len();
            self.file = file;
        } else {
            tracing::warn!(
                path = %layout.path.display(),
                segment = old,
                "the accounting file was truncated by another program (copytruncate); its records went with the copy"
            );
            manifest.lost.insert(old, self.written);
            self.written = ours.len();
        }
        manifest.current = old + 1;
        manifest.opened = now_secs();
        layout.store_manifest(&manifest)?;
        drop(manifest);
        metrics::counter!(crate::metrics_names::ROTATIONS, "reason" => "outside").increment(1);
        self.publish();
        Ok(())
    }

    fn rotation_due(&self) -> Option<&'static str> {
        if self.written == 0 {
            return None;
        }
        if self.written >= self.rotation.size {
            return Some("size");
        }
        let opened = self.shared.manifest().opened;
        let age = self.rotation.age?;
        (now_secs().saturating_sub(opened) >= age.as_secs()).then_some("age")
    }

    /// How long the thread may sleep before the age rule closes the segment.
    fn until_age_rotation(&self) -> Duration {
        let Some(age) = self.rotation.age else {
            return Duration::from_secs(3600);
        };
        let opened = self.shared.manifest().opened;
        let due = opened.saturating_add(age.as_secs());
        Duration::from_secs(due.saturating_sub(now_secs()).clamp(1, 3600))
    }

    /// Closes the current segment as `<path>.<n>` and starts `n + 1` at `path`.
    fn rotate(&mut self, reason: &'static str) -> std::io::Result<()> {
        let layout = self.shared.layout.clone();
        let mut manifest = self.shared.manifest();
        let closed = manifest.current;
        std::fs::rename(&layout.path, layout.closed_path(closed))?;
        segments::sync_dir(&layout.dir)?;
        let file = segments::open_append(&layout.path)?;
        let meta = file.metadata()?;
        manifest.current = closed + 1;
        manifest.inode = meta.ino();
        manifest.device = meta.dev();
        manifest.opened = now_secs();
        layout.store_manifest(&manifest)?;
        drop(manifest);
        self.file = file;
        self.written = 0;
        self.publish();
        if let Some(csv) = &mut self.csv {
            if let Err(e) = csv.rotate(&layout, closed) {
                tracing::error!(error = %e, "could not rotate the CSV accounting file");
            }
        }
        metrics::counter!(crate::metrics_names::ROTATIONS, "reason" => reason).increment(1);
        tracing::info!(segment = closed, reason, "closed an accounting segment");
        if let Some(compressor) = &self.compressor {
            let _ = compressor.send(closed);
        }
        Ok(())
    }

    fn close(&mut self) {
        let mut manifest = self.shared.manifest();
        manifest.clean_len = Some(self.written);
        if let Err(e) = self.shared.layout.store_manifest(&manifest) {
            tracing::warn!(error = %e, "could not note the clean stop in the accounting manifest");
        }
    }
}

fn spawn_compressor(shared: Arc<Shared>) -> std::io::Result<mpsc::Sender<u64>> {
    let (tx, rx) = mpsc::channel::<u64>();
    // Segments closed before a crash but never compressed are done first.
    let current = shared.manifest().current;
    if let Ok(closed) = shared.layout.closed() {
        for (segment, (_, compressed)) in closed {
            if !compressed && segment < current {
                let _ = tx.send(segment);
            }
        }
    }
    thread::Builder::new()
        .name("accounting-zstd".into())
        .spawn(move || {
            while let Ok(segment) = rx.recv() {
                if let Err(e) = segments::compress(&shared.layout, segment) {
                    tracing::error!(segment, error = %e, "could not compress an accounting segment");
                }
                let csv = shared.layout.closed_csv_path(segment);
                if csv.exists() {
                    if let Err(e) = segments::compress_file(&csv) {
                        tracing::error!(segment, error = %e, "could not compress a CSV accounting segment");
                    }
                }
            }
        })?;
    Ok(tx)
}

fn writer_loop(mut log: Log, rx: mpsc::Receiver<Job>) {
    loop {
        let first = match rx.recv_timeout(log.until_age_rotation()) {
            Ok(job) => job,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(reason) = log.rotation_due() {
                    if let Err(e) = log.rotate(reason) {
                        tracing::error!(path = %log.path().display(), error = %e, "accounting rotation failed");
                    }
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        // Everything queued while the last sync ran goes into this one: that is the group commit.
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        let mut closes = Vec::new();
        let mut batch = Vec::new();
        for job in jobs {
            match job {
                Job::Records {
                    lines,
                    counted,
                    done,
                } => batch.push((lines, counted, done)),
                Job::Close { done } => closes.push(done),
            }
        }
        if !batch.is_empty() {
            write_jobs(&mut log, batch);
        }
        if let Some(reason) = log.rotation_due() {
            if let Err(e) = log.rotate(reason) {
                tracing::error!(path = %log.path().display(), error = %e, "accounting rotation failed");
            }
        }
        if !closes.is_empty() {
            log.close();
            for done in closes {
                let _ = done.send(());
            }
        }
    }
}

type Batch = Vec<(
    Vec<String>,
    Vec<(RecordType, Option<BounceCategory>)>,
    oneshot::Sender<Result<(), String>>,
)>;

fn write_jobs(log: &mut Log, batch: Batch) {
    let result = write_both(log, &batch);
    match &result {
        Ok(bytes) => {
            log.written += bytes;
            log.publish();
        }
        Err(e) => {
            tracing::error!(path = %log.path().display(), error = %e, "accounting write failed");
            discard_failed(log);
            if let Some(csv) = &mut log.csv {
                csv.discard_failed();
            }
        }
    }
    for (_, counted, done) in batch {
        let answer = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
        if answer.is_ok() {
            for (kind, category) in &counted {
                crate::metrics_names::count(*kind, *category);
            }
        }
        let _ = done.send(answer);
    }
}

/// Writes a batch to the log and, when configured, its CSV copy; both synced before anyone
/// is answered. A CSV failure fails the batch (and cuts the JSON lines off again), so a retry
/// never finds the two out of step.
fn write_both(log: &mut Log, batch: &Batch) -> std::io::Result<u64> {
    log.follow_outside_rotation()?;
    if let Some(csv) = &mut log.csv {
        csv.follow_outside_rotation()?;
    }
    let bytes = write_batch(log, batch)?;
    if let Some(csv) = &mut log.csv {
        if let Err(e) = csv.write(batch) {
            let _ = log
                .file
                .set_len(log.written)
                .and_then(|()| log.file.sync_data());
            return Err(e);
        }
    }
    Ok(bytes)
}

/// Undoes a failed batch: its callers are told it failed and may write the same records again
/// (the engine retries final records), so the part that reached the file (a torn line on a
/// full disk) may not stay. Cutting the file back also frees the space.
fn discard_failed(log: &mut Log) {
    // The length is taken fresh: cutting at a stale one after an outside truncation would
    // pad the file with zeros instead.
    let on_disk = log.file.metadata().map_or(log.written, |m| m.len());
    let keep = log.written.min(on_disk);
    if let Err(e) = log.file.set_len(keep).and_then(|()| log.file.sync_data()) {
        tracing::error!(path = %log.path().display(), error = %e, "cannot cut a failed write off the accounting file");
        // What stays in the file is unknown; re-read its length so offsets stay honest.
        if let Ok(meta) = log.file.metadata() {
            log.written = meta.len();
        }
    } else {
        log.written = keep;
    }
}

/// Writes a group of records with one `write` and one `fdatasync`.
fn write_batch(log: &mut Log, batch: &Batch) -> std::io::Result<u64> {
    log.buf.clear();
    for (lines, _, _) in batch {
        for line in lines {
            log.buf.extend_from_slice(line.as_bytes());
            log.buf.push(b'\n');
        }
    }
    let result = log
        .file
        .write_all(&log.buf)
        .and_then(|()| log.file.sync_data());
    let bytes = log.buf.len() as u64;
    if log.buf.capacity() > MAX_KEPT_BUFFER {
        // A burst's buffer is not kept for the quiet hours after it.
        log.buf = Vec::new();
    }
    result.map(|()| bytes)
}

/// The largest write buffer kept between batches.
const MAX_KEPT_BUFFER: usize = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BounceCategory, RecordType};
    use std::collections::HashSet;

    #[tokio::test]
    async fn records_are_json_lines_with_contract_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/accounting.jsonl");
        let acct = Accounting::open(&path).unwrap();
        let mut r = Record::new(RecordType::Bounce, "abc");
        r.recipient = "ann@example.test".into();
        r.domain = "example.test".into();
        r.bounce_category = Some(BounceCategory::BadMailbox);
        r.attempt = 1;
        acct.record(r).await.unwrap();
        acct.record_all(vec![Record::new(RecordType::Delivery, "def")])
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["type"], "Bounce");
        assert_eq!(lines[0]["bounce_category"], "bad-mailbox");
        assert_eq!(lines[0]["campaign"], serde_json::Value::Null);
        assert!(lines[0]["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(lines[1]["type"], "Delivery");
        assert_eq!(lines[1]["id"], "def");
        let back: Record = serde_json::from_value(lines[0].clone()).unwrap();
        assert_eq!(back.kind, RecordType::Bounce);
        assert_eq!(acct.synced_position().offset, text.len() as u64);
    }

    #[tokio::test]
    async fn writers_wait_while_the_queue_is_full_and_nothing_leaks() {
        let dir = tempfile::tempdir().unwrap();
        let acct = Accounting::open(&dir.path().join("a.jsonl")).unwrap();
        let all = (MAX_PENDING_BYTES / PENDING_UNIT) as u32;
        // The queue is full (records of others still waiting for their sync).
        let held = Arc::clone(&acct.pending)
            .acquire_many_owned(all)
            .await
            .unwrap();
        let writer = acct.clone();
        let waiting = tokio::spawn(async move { writer.record_lines(vec!["{}".to_owned()]).await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "wrote past a full queue");
        assert_eq!(acct.synced_position().offset, 0);
        assert_eq!(acct.pending_bytes(), MAX_PENDING_BYTES as u64);
        drop(held);
        waiting.await.unwrap().unwrap();
        assert_eq!(acct.synced_position().offset, 3);
        assert_eq!(acct.pending.available_permits(), all as usize);
        assert_eq!(acct.pending_bytes(), 0);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, "{\"type\":\"Reception\"}\n{\"type\":\"Deliv").unwrap();
        let acct = Accounting::open(&path).unwrap();
        assert_eq!(acct.synced_position().offset, 21);
        acct.record(Record::new(RecordType::Delivery, "x"))
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
            "{text}"
        );
        assert_eq!(text.lines().count(), 2);
    }

    #[tokio::test]
    async fn final_ids_are_found_after_a_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let acct = Accounting::open(&path).unwrap();
        acct.record(Record::new(RecordType::Delivery, "before"))
            .await
            .unwrap();
        let from = acct.synced_position();
        acct.record_all(vec![
            Record::new(RecordType::TransientFailure, "deferred"),
            Record::new(RecordType::Bounce, "bounced"),
        ])
        .await
        .unwrap();
        acct.record_lines(vec![Accounting::to_line(&Record::new(
            RecordType::Expiration,
            "raw",
        ))])
        .await
        .unwrap();
        // A torn line at the end, as a crash mid-write leaves it: never synced, never read.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"type\":\"Deliv")
            .unwrap();
        let ids = acct.final_ids_since(from).unwrap();
        assert_eq!(ids, HashSet::from(["bounced".to_owned(), "raw".to_owned()]));
        let past = Position::new(from.segment, 1 << 40);
        assert!(matches!(
            acct.final_ids_since(past),
            Err(AccountingError::PastEnd { .. })
        ));
    }

    fn small_segments() -> Rotation {
        Rotation {
            size: 1000,
            age: None,
            compress: false,
        }
    }

    async fn write_ids(acct: &Accounting, ids: std::ops::Range<u32>) {
        for i in ids {
            acct.record(Record::new(RecordType::Delivery, format!("m{i}")))
                .await
                .unwrap();
        }
    }

    fn ids_of(lines: &[crate::Line]) -> Vec<String> {
        lines
            .iter()
            .map(|l| serde_json::from_str::<Record>(&l.text).unwrap().id)
            .collect()
    }

    #[tokio::test]
    async fn segments_rotate_by_size_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let acct = Accounting::open_with(&path, small_segments()).unwrap();
        write_ids(&acct, 0..40).await;
        let closed = Layout::new(&path).closed().unwrap();
        assert!(closed.len() >= 5, "{closed:?}");
        for (file, _) in closed.values() {
            let len = std::fs::metadata(file).unwrap().len();
            assert!((1000..1400).contains(&len), "{len}");
        }
        assert!(acct.synced_position().segment >= 5);
        let mut reader = acct.reader(Position::default());
        let lines = reader.read(1000).unwrap();
        let expected: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
        assert_eq!(ids_of(&lines), expected);
        assert_eq!(reader.position(), acct.synced_position());
        // Each line's end is the next one's start, or the next segment's beginning.
        for pair in lines.windows(2) {
            assert!(
                pair[0].end == pair[1].start
                    || (pair[1].start == Position::new(pair[0].end.segment + 1, 0))
            );
        }
        // A reader from the middle reads the rest, across segments.
        let mut middle = acct.reader(lines[17].start);
        assert_eq!(ids_of(&middle.read(1000).unwrap()), expected[17..].to_vec());
        assert!(middle.read(10).unwrap().is_empty());
        write_ids(&acct, 40..42).await;
        assert_eq!(ids_of(&middle.read(10).unwrap()), vec!["m40", "m41"]);
    }

    #[tokio::test]
    async fn compressed_segments_read_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let rotation = Rotation {
            compress: true,
            ..small_segments()
        };
        let acct = Accounting::open_with(&path, rotation).unwrap();
        write_ids(&acct, 0..30).await;
        let layout = Layout::new(&path);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !layout.closed().unwrap().values().all(|(_, c)| *c) {
            assert!(std::time::Instant::now() < deadline, "never compressed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lines = acct.reader(Position::default()).read(1000).unwrap();
        let expected: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
        assert_eq!(ids_of(&lines), expected);
        // From the middle of a compressed segment.
        let from = lines[3].start;
        assert_eq!(from.segment, 0);
        let rest = acct.reader(from).read(1000).unwrap();
        assert_eq!(ids_of(&rest), expected[3..].to_vec());
    }

    #[tokio::test]
    async fn an_outside_mv_while_running_starts_a_new_segment_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let acct = Accounting::open(&path).unwrap();
        write_ids(&acct, 0..3).await;
        let before = acct.synced_position();
        std::fs::rename(&path, dir.path().join("a.jsonl.old")).unwrap();
        write_ids(&acct, 3..5).await;
        let after = acct.synced_position();
        assert_eq!(after.segment, before.segment + 1);
        // The new records are in a new file at the path, for `tail -F`.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        let all = acct.reader(Position::default()).read(100).unwrap();
        assert_eq!(ids_of(&all), vec!["m0", "m1", "m2", "m3", "m4"]);
        // And after a restart too.
        drop(acct);
        let acct = Accounting::open(&path).unwrap();
        let all = acct.reader(Position::default()).read(100).unwrap();
        assert_eq!(ids_of(&all), vec!["m0", "m1", "m2", "m3", "m4"]);
    }

    #[tokio::test]
    async fn an_outside_copytruncate_neither_pads_nor_misreads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let acct = Accounting::open(&path).unwrap();
        write_ids(&acct, 0..3).await;
        let reader_from = acct.synced_position();
        std::fs::copy(&path, dir.path().join("a.jsonl.1")).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        write_ids(&acct, 3..5).await;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains('\0'), "padded with zeros: {text:?}");
        assert_eq!(text.lines().count(), 2);
        // A reader at the end of the truncated segment lost nothing and goes on.
        let mut caught_up = acct.reader(reader_from);
        assert_eq!(ids_of(&caught_up.read(10).unwrap()), vec!["m3", "m4"]);
        // One inside it is told, not handed the new segment's records as the old one's.
        let mut reader = acct.reader(Position::new(reader_from.segment, 0));
        assert!(matches!(
            reader.read(10),
            Err(AccountingError::MissingSegment { .. })
        ));
        reader.skip_segment();
        assert_eq!(ids_of(&reader.read(10).unwrap()), vec!["m3", "m4"]);
    }

    #[tokio::test]
    async fn a_clean_stop_makes_losing_the_file_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let acct = Accounting::open(&path).unwrap();
        write_ids(&acct, 0..3).await;
        let end = acct.synced_position();
        acct.close().await;
        drop(acct);
        std::fs::remove_file(&path).unwrap();
        let acct = Accounting::open(&path).unwrap();
        assert_eq!(acct.synced_position(), Position::new(end.segment + 1, 0));
        assert!(acct.final_ids_since(end).unwrap().is_empty());
        // Without the clean stop, what was owed is missing: said so, not skipped.
        write_ids(&acct, 3..4).await;
        let owed = Position::new(acct.synced_position().segment, 0);
        drop(acct);
        std::fs::remove_file(&path).unwrap();
        let acct = Accounting::open(&path).unwrap();
        assert!(matches!(
            acct.final_ids_since(owed),
            Err(AccountingError::MissingSegment { .. })
        ));
    }

    #[tokio::test]
    async fn the_csv_copy_has_a_header_per_file_and_rotates_with_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let csv = CsvFormat::new(&["type".to_owned(), "id".to_owned(), "rcpt".to_owned()]).unwrap();
        let acct = Accounting::open_full(&path, small_segments(), Some(csv.clone())).unwrap();
        write_ids(&acct, 0..12).await;
        // Answered after the rotation that followed the last batch.
        acct.close().await;
        let layout = Layout::new(&path);
        let closed = layout.closed().unwrap();
        assert!(closed.len() >= 2);
        let mut all = Vec::new();
        let listing: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        for segment in closed.keys() {
            let text = std::fs::read_to_string(layout.closed_csv_path(*segment))
                .unwrap_or_else(|e| panic!("segment {segment}: {e}; {listing:?}"));
            let mut lines = text.split("\r\n");
            assert_eq!(lines.next(), Some("type,id,rcpt"));
            all.extend(lines.filter(|l| !l.is_empty()).map(str::to_owned));
        }
        let current = std::fs::read_to_string(layout.csv_path()).unwrap();
        let mut lines = current.split("\r\n");
        assert_eq!(lines.next(), Some("type,id,rcpt"));
        all.extend(lines.filter(|l| !l.is_empty()).map(str::to_owned));
        let expected: Vec<String> = (0..12).map(|i| format!("d,m{i},")).collect();
        assert_eq!(all, expected);
        // After a restart the file goes on, without a second header.
        drop(acct);
        let acct = Accounting::open_full(&path, small_segments(), Some(csv)).unwrap();
        write_ids(&acct, 12..13).await;
        let current = std::fs::read_to_string(layout.csv_path()).unwrap();
        assert_eq!(current.matches("type,id,rcpt").count(), 1);
        assert!(current.ends_with("d,m12,\r\n"));
    }

    #[tokio::test]
    async fn rotation_by_age_closes_a_segment_that_is_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let rotation = Rotation {
            size: 1 << 30,
            age: Some(Duration::from_secs(1)),
            compress: false,
        };
        let acct = Accounting::open_with(&path, rotation).unwrap();
        write_ids(&acct, 0..1).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while acct.synced_position().segment == 0 {
            assert!(std::time::Instant::now() < deadline, "never rotated");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(acct.synced_position(), Position::new(1, 0));
        assert!(Layout::new(&path).closed_path(0).exists());
        // An empty segment is not closed again and again.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(acct.synced_position().segment, 1);
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_when_records_are_synced() {
        let dir = tempfile::tempdir().unwrap();
        let acct = Accounting::open(&dir.path().join("a.jsonl")).unwrap();
        let mut reader = acct.reader(acct.synced_position());
        let writer = acct.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            write_ids(&writer, 0..1).await;
        });
        reader.wait(Duration::from_secs(10)).await;
        assert_eq!(ids_of(&reader.read(10).unwrap()), vec!["m0"]);
    }
}

#[cfg(test)]
mod full_disk_tests {
    use super::*;
    use std::process::Command;

    #[tokio::test]
    async fn a_failed_batch_leaves_no_torn_line_and_is_not_written_later() {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipping: cannot mount a tmpfs (needs root)");
            return;
        }
        // Unmounts even if an assertion below fails.
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = Command::new("umount").arg("-l").arg(self.0).status();
            }
        }
        let _unmount = Unmount(dir.path());
        let ballast = dir.path().join("ballast");
        std::fs::write(&ballast, vec![0u8; 900 << 10]).unwrap();
        let path = dir.path().join("a.jsonl");
        let acct = Accounting::open(&path).unwrap();
        let mut record = Record::new(RecordType::Delivery, "x");
        record.recipient = "r".repeat(4000);
        let mut written = 0;
        let failed = loop {
            record.id = format!("id{written}");
            match acct.record(record.clone()).await {
                Ok(()) => written += 1,
                Err(_) => break record.id.clone(),
            }
            assert!(written < 1000, "the disk never filled up");
        };
        assert_eq!(
            acct.synced_position().offset,
            std::fs::metadata(&path).unwrap().len()
        );
        std::fs::remove_file(&ballast).unwrap();
        record.id = "after".into();
        acct.record(record).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Record>(l).unwrap().id)
            .collect();
        assert_eq!(ids.len(), written + 1);
        assert!(!ids.contains(&failed));
        assert_eq!(ids.last().map(String::as_str), Some("after"));
    }
}
