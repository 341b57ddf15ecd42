//! Reading the accounting log from a position, across segments, never past what is synced.
//!
//! Used at start-up (which final records were written after the checkpoint) and by webhook
//! senders that follow the log from a durable cursor. A reader only ever returns whole lines
//! that are on disk: a line written but not yet synced may still be cut off after a failed
//! write, and must not reach anyone.

use crate::writer::Shared;
use crate::{Accounting, AccountingError, Position, RecordType};
use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Bytes read from a segment at a time.
const CHUNK: usize = 64 * 1024;

/// One record as it is in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Where the line starts.
    pub start: Position,
    /// Just after its newline: where the next line starts.
    pub end: Position,
    /// The record's JSON object, without the newline.
    pub text: String,
}

/// A line's start, end and bytes, borrowed from the reader's buffer.
type RawLine<'a> = (Position, Position, &'a [u8]);

enum Segment {
    Plain(File),
    Compressed(Box<zstd::Decoder<'static, BufReader<File>>>),
}

/// Follows the accounting log from a position.
pub struct Reader {
    shared: Arc<Shared>,
    synced: watch::Receiver<Position>,
    /// Where the next unread line starts.
    pos: Position,
    segment: Option<Segment>,
    /// Bytes read past `pos`; `buf[head..]` is not yet consumed.
    buf: Vec<u8>,
    head: usize,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("pos", &self.pos).finish()
    }
}

impl Accounting {
    /// A reader of the records at and after `from`.
    pub fn reader(&self, from: Position) -> Reader {
        Reader {
            shared: Arc::clone(&self.shared),
            synced: self.shared.synced.subscribe(),
            pos: from,
            segment: None,
            buf: Vec::new(),
            head: 0,
        }
    }

    /// The ids with a final record (`Delivery`, `Bounce`, `Expiration`, `AdminBounce`, `Transfer`) and
    /// with a `Reception` record at or after `from`, across segments. Used at start-up to
    /// settle what a crash left half done; reads only what was written since.
    pub fn ids_since(&self, from: Position) -> Result<Recorded, AccountingError> {
        #[derive(serde::Deserialize)]
        struct Probe {
            #[serde(rename = "type")]
            kind: RecordType,
            id: String,
        }
        let mut recorded = Recorded::default();
        let mut reader = self.reader(from);
        loop {
            let lines = reader.read(4096)?;
            if lines.is_empty() {
                return Ok(recorded);
            }
            for line in lines {
                if let Ok(p) = serde_json::from_str::<Probe>(&line.text) {
                    if p.kind.is_final() {
                        recorded.finals.insert(p.id);
                    } else if p.kind == RecordType::Reception {
                        recorded.receptions.insert(p.id);
                    }
                }
            }
        }
    }

    /// The ids with a final record at or after `from` (see [`Accounting::ids_since`]).
    pub fn final_ids_since(&self, from: Position) -> Result<HashSet<String>, AccountingError> {
        Ok(self.ids_since(from)?.finals)
    }
}

/// Ids found by [`Accounting::ids_since`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// Messages with a final record.
    pub finals: HashSet<String>,
    /// Messages with a `Reception` record.
    pub receptions: HashSet<String>,
}

impl Reader {
    /// Another reader of the same log, at `at`.
    pub fn fork(&self, at: Position) -> Reader {
        Reader {
            shared: Arc::clone(&self.shared),
            synced: self.shared.synced.subscribe(),
            pos: at,
            segment: None,
            buf: Vec::new(),
            head: 0,
        }
    }

    /// Where the next unread record starts.
    pub fn position(&self) -> Position {
        self.pos
    }

    /// The end of what is on disk now.
    pub fn synced(&self) -> Position {
        *self.synced.borrow()
    }

    /// Up to `max` whole, synced records after the position; empty when caught up. Does not
    /// wait.
    pub fn read(&mut self, max: usize) -> Result<Vec<Line>, AccountingError> {
        let mut out = Vec::new();
        while out.len() < max {
            match self.next_line()? {
                Some((start, end, text)) => out.push(Line {
                    start,
                    end,
                    text: String::from_utf8_lossy(text).into_owned(),
                }),
                None => break,
            }
        }
        Ok(out)
    }

    /// Skips up to `max` records without returning them; returns how many were skipped.
    pub fn skip(&mut self, max: u64) -> Result<u64, AccountingError> {
        let mut n = 0;
        while n < max && self.next_line()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    /// Waits until something past the position is synced, or `timeout`.
    pub async fn wait(&mut self, timeout: Duration) {
        let pos = self.pos;
        let _ = tokio::time::timeout(timeout, self.synced.wait_for(|s| *s > pos)).await;
    }

    /// Gives up on the segment the reader is in (it is missing) and goes on with the next.
    pub fn skip_segment(&mut self) {
        self.pos = Position::new(self.pos.segment + 1, 0);
        self.segment = None;
        self.buf.clear();
        self.head = 0;
    }

    /// Bytes on disk after the position (compressed segments count as stored).
    pub fn backlog_bytes(&self) -> u64 {
        let synced = self.synced();
        if self.pos.segment == synced.segment {
            return synced.offset.saturating_sub(self.pos.offset);
        }
        let closed = self.shared.layout.closed().unwrap_or_default();
        let mut total = synced.offset;
        for segment in self.pos.segment..synced.segment {
            let len = closed
                .get(&segment)
                .and_then(|(p, _)| std::fs::metadata(p).ok())
                .map_or(0, |m| m.len());
            total += if segment == self.pos.segment {
                len.saturating_sub(self.pos.offset)
            } else {
                len
            };
        }
        total
    }

    /// The next whole synced line, moving the position past it.
    fn next_line(&mut self) -> Result<Option<RawLine<'_>>, AccountingError> {
        loop {
            if let Some(i) = self.buf[self.head..].iter().position(|b| *b == b'\n') {
                let start = self.pos;
                let from = self.head;
                self.head += i + 1;
                self.pos.offset += i as u64 + 1;
                return Ok(Some((start, self.pos, &self.buf[from..from + i])));
            }
            let synced = self.synced();
            if self.pos.segment > synced.segment {
                return Ok(None);
            }
            if self.segment.is_none() && !self.open_segment(synced)? {
                continue;
            }
            // The current segment is read up to its synced end; a closed one to its end.
            let limit = (self.pos.segment == synced.segment).then_some(synced.offset);
            if limit.is_none() && self.shared.manifest().lost.contains_key(&self.pos.segment) {
                // Truncated under a reader that had it open: the file now holds a later
                // segment, which must not be read as this one.
                self.skip_segment();
                continue;
            }
            if self.fill(limit)? == 0 {
                if limit.is_some() {
                    return Ok(None);
                }
                if self.head < self.buf.len() {
                    tracing::warn!(
                        segment = self.pos.segment,
                        bytes = self.buf.len() - self.head,
                        "ignoring a torn last line in a closed accounting segment"
                    );
                }
                self.skip_segment();
            }
        }
    }

    /// Opens the reader's segment. False when it was passed over instead (it ended where the
    /// reader stands before it went missing).
    fn open_segment(&mut self, synced: Position) -> Result<bool, AccountingError> {
        let segment = self.pos.segment;
        let offset = self.pos.offset;
        let manifest = self.shared.manifest();
        let missing = || AccountingError::MissingSegment {
            segment,
            expected: self.shared.layout.closed_path(segment),
        };
        if let Some(&len) = manifest.lost.get(&segment) {
            if offset >= len {
                drop(manifest);
                self.skip_segment();
                return Ok(false);
            }
            return Err(missing());
        }
        let io = |path: &std::path::Path, source| AccountingError::Io {
            path: path.to_owned(),
            source,
        };
        let located = self
            .shared
            .layout
            .locate(segment, &manifest)
            .map_err(|e| io(&self.shared.layout.path, e))?;
        let Some((path, compressed)) = located else {
            return Err(missing());
        };
        // Opened under the manifest lock: the writer cannot rotate in between.
        let file = File::open(&path).map_err(|e| io(&path, e))?;
        drop(manifest);
        let past_end = |len: u64| AccountingError::PastEnd {
            position: self.pos,
            len,
        };
        let opened = if compressed {
            let mut decoder = zstd::Decoder::new(file).map_err(|e| io(&path, e))?;
            let skipped = std::io::copy(&mut (&mut decoder).take(offset), &mut std::io::sink())
                .map_err(|e| io(&path, e))?;
            if skipped < offset {
                return Err(past_end(skipped));
            }
            Segment::Compressed(Box::new(decoder))
        } else {
            let len = if segment == synced.segment {
                synced.offset
            } else {
                file.metadata().map_err(|e| io(&path, e))?.len()
            };
            if offset > len {
                return Err(past_end(len));
            }
            Segment::Plain(file)
        };
        self.segment = Some(opened);
        self.buf.clear();
        self.head = 0;
        Ok(true)
    }

    /// Reads more of the segment after what `buf` holds; at most up to `limit` (an offset).
    fn fill(&mut self, limit: Option<u64>) -> Result<usize, AccountingError> {
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        let read_to = self.pos.offset + self.buf.len() as u64;
        let want = match limit {
            Some(limit) => (limit.saturating_sub(read_to) as usize).min(CHUNK),
            None => CHUNK,
        };
        if want == 0 {
            return Ok(0);
        }
        let old = self.buf.len();
        self.buf.resize(old + want, 0);
        let result = match &mut self.segment {
            Some(Segment::Plain(file)) => file.read_at(&mut self.buf[old..], read_to),
            Some(Segment::Compressed(decoder)) => decoder.read(&mut self.buf[old..]),
            None => Ok(0),
        };
        let n = match result {
            Ok(n) => n,
            Err(source) => {
                self.buf.truncate(old);
                return Err(AccountingError::Io {
                    path: self.shared.layout.path.clone(),
                    source,
                });
            }
        };
        self.buf.truncate(old + n);
        Ok(n)
    }
}
