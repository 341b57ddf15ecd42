//! The group-committing JSON Lines writer.

use crate::{BounceCategory, Record, RecordType};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use tokio::sync::oneshot;

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

struct Job {
    /// Serialised by the caller, so the writer thread only writes and syncs.
    lines: Vec<String>,
    counted: Vec<(RecordType, Option<BounceCategory>)>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Bytes of records queued for the writer thread and not yet synced. Callers beyond it wait
/// for room (back-pressure) rather than letting the queue grow while a sync is slow.
pub(crate) const MAX_PENDING_BYTES: usize = 64 << 20;
/// The unit of [`MAX_PENDING_BYTES`] accounting (semaphore permits are u32).
const PENDING_UNIT: usize = 1024;

/// Handle to the accounting file; cheap to clone.
#[derive(Clone)]
pub struct Accounting {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
    synced_len: Arc<AtomicU64>,
    /// Room in the writer's queue, in [`PENDING_UNIT`]s.
    pending: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Accounting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounting")
            .field("path", &self.path)
            .finish()
    }
}

impl Accounting {
    /// Opens (creating parents and the file) `path` for appending and starts the writer thread.
    pub fn open(path: &Path) -> Result<Accounting, AccountingError> {
        let io = |source| AccountingError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        drop_torn_tail(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let synced_len = Arc::new(AtomicU64::new(len));
        let (tx, rx) = mpsc::channel();
        let thread_path = path.to_owned();
        let thread_len = Arc::clone(&synced_len);
        thread::Builder::new()
            .name("accounting".into())
            .spawn(move || writer_loop(file, rx, &thread_path, &thread_len))
            .map_err(io)?;
        Ok(Accounting {
            tx,
            path: path.to_owned(),
            synced_len,
            pending: Arc::new(tokio::sync::Semaphore::new(
                MAX_PENDING_BYTES / PENDING_UNIT,
            )),
        })
    }

    /// Bytes of the file known to be on disk. Records appended from now on start at or after
    /// this offset.
    pub fn synced_len(&self) -> u64 {
        self.synced_len.load(Ordering::SeqCst)
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

    /// The file records go to.
    pub fn path(&self) -> &Path {
        &self.path
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
            .send(Job {
                lines,
                counted,
                done,
            })
            .map_err(|_| AccountingError::Stopped)?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(AccountingError::Io {
                path: self.path.clone(),
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

/// Ids that have a final record (`Delivery`, `Bounce`, `Expiration`, `AdminBounce`) in the
/// file at or after `offset`. Used after a crash to tell which pending final records were
/// written; reads only the tail written since.
pub fn final_ids_since(path: &Path, offset: u64) -> std::io::Result<HashSet<String>> {
    let mut ids = HashSet::new();
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
        Err(e) => return Err(e),
    };
    if offset > file.metadata()?.len() {
        // The file was rotated or truncated: nothing of ours is in it.
        return Ok(ids);
    }
    file.seek(SeekFrom::Start(offset))?;
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "type")]
        kind: RecordType,
        id: String,
    }
    for line in BufReader::new(file).lines() {
        let line = line?;
        // A torn last line (crash mid-write) does not parse and does not count.
        if let Ok(p) = serde_json::from_str::<Probe>(&line) {
            if p.kind.is_final() {
                ids.insert(p.id);
            }
        }
    }
    Ok(ids)
}

fn writer_loop(file: File, rx: mpsc::Receiver<Job>, path: &Path, synced_len: &AtomicU64) {
    let mut written = synced_len.load(Ordering::SeqCst);
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    while let Ok(first) = rx.recv() {
        // Everything queued while the last sync ran goes into this one: that is the group commit.
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        let result = write_batch(&mut out, &jobs);
        match &result {
            Ok(bytes) => {
                written += bytes;
                synced_len.store(written, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "accounting write failed");
                out = discard_failed(out, path, &mut written);
            }
        }
        for job in jobs {
            let answer = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            if answer.is_ok() {
                for (kind, category) in &job.counted {
                    crate::metrics_names::count(*kind, *category);
                }
            }
            let _ = job.done.send(answer);
        }
    }
    let _ = out.flush();
}

/// Undoes a failed batch: its callers are told it failed and may write the same records again
/// (the engine retries final records), so neither its buffered rest nor the part that reached
/// the file (a torn line on a full disk) may stay. Cutting the file back also frees the space.
fn discard_failed(out: BufWriter<File>, path: &Path, written: &mut u64) -> BufWriter<File> {
    let (file, _unwritten) = out.into_parts();
    if let Err(e) = file.set_len(*written).and_then(|()| file.sync_data()) {
        tracing::error!(path = %path.display(), error = %e, "cannot cut a failed write off the accounting file");
        // What stays in the file is unknown; re-read its length so offsets stay honest.
        if let Ok(meta) = file.metadata() {
            *written = meta.len();
        }
    }
    BufWriter::with_capacity(256 * 1024, file)
}

fn write_batch(out: &mut BufWriter<File>, jobs: &[Job]) -> std::io::Result<u64> {
    let mut bytes = 0;
    for job in jobs {
        for line in &job.lines {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            bytes += line.len() as u64 + 1;
        }
    }
    out.flush()?;
    out.get_ref().sync_data()?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BounceCategory, RecordType};

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
        assert_eq!(acct.synced_len(), text.len() as u64);
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
        assert_eq!(acct.synced_len(), 0);
        drop(held);
        waiting.await.unwrap().unwrap();
        assert_eq!(acct.synced_len(), 3);
        assert_eq!(acct.pending.available_permits(), all as usize);
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, "{\"type\":\"Reception\"}\n{\"type\":\"Deliv").unwrap();
        let acct = Accounting::open(&path).unwrap();
        assert_eq!(acct.synced_len(), 21);
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
    async fn final_ids_are_found_after_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let acct = Accounting::open(&path).unwrap();
        acct.record(Record::new(RecordType::Delivery, "before"))
            .await
            .unwrap();
        let offset = acct.synced_len();
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
        // A torn line at the end, as a crash mid-write leaves it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"type\":\"Deliv")
            .unwrap();
        let ids = final_ids_since(&path, offset).unwrap();
        assert_eq!(ids, HashSet::from(["bounced".to_owned(), "raw".to_owned()]));
        assert!(final_ids_since(&path, 1 << 40).unwrap().is_empty());
        assert!(final_ids_since(&dir.path().join("none"), 0)
            .unwrap()
            .is_empty());
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
        assert_eq!(acct.synced_len(), std::fs::metadata(&path).unwrap().len());
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
