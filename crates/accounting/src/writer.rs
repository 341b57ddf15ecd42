//! The group-committing JSON Lines writer.

use crate::Record;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
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
}

struct Job {
    records: Vec<Record>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Handle to the accounting file; cheap to clone.
#[derive(Clone)]
pub struct Accounting {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
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
        let (tx, rx) = mpsc::channel();
        let thread_path = path.to_owned();
        thread::Builder::new()
            .name("accounting".into())
            .spawn(move || writer_loop(file, rx, &thread_path))
            .map_err(io)?;
        Ok(Accounting {
            tx,
            path: path.to_owned(),
        })
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
        if records.is_empty() {
            return Ok(());
        }
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Job { records, done })
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

fn writer_loop(file: File, rx: mpsc::Receiver<Job>, path: &Path) {
    let mut out = BufWriter::with_capacity(256 * 1024, file);
    while let Ok(first) = rx.recv() {
        // Everything queued while the last sync ran goes into this one: that is the group commit.
        let mut jobs = vec![first];
        while let Ok(job) = rx.try_recv() {
            jobs.push(job);
        }
        let result = write_batch(&mut out, &jobs);
        if let Err(e) = &result {
            tracing::error!(path = %path.display(), error = %e, "accounting write failed");
        }
        for job in jobs {
            let answer = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
            if answer.is_ok() {
                for record in &job.records {
                    crate::metrics_names::count(record);
                }
            }
            let _ = job.done.send(answer);
        }
    }
    let _ = out.flush();
}

fn write_batch(out: &mut BufWriter<File>, jobs: &[Job]) -> std::io::Result<()> {
    for job in jobs {
        for record in &job.records {
            serde_json::to_writer(&mut *out, record)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    out.get_ref().sync_data()
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
    }
}
