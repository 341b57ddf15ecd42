//! The segmented layout of the accounting log.
//!
//! `accounting.path` always holds the newest records (so `tail -F` works); closed segments sit
//! beside it as `<path>.<sequence>` (six digits or more), or `<path>.<sequence>.zst` once
//! compressed. A small manifest beside them (`.<name>.segments`, JSON, replaced atomically)
//! names the current segment's sequence number and inode: that is how a rename or truncation
//! by an outside tool (`mv`, logrotate with or without `copytruncate`) is told from Drover's own
//! rotation, while running or while stopped, and where a moved segment went.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What the manifest remembers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Manifest {
    /// The sequence number of the file at `path`.
    pub(crate) current: u64,
    /// Its inode and device, to recognise it after an outside rename.
    pub(crate) inode: u64,
    pub(crate) device: u64,
    /// When it was opened (seconds since the epoch), for rotation by age across restarts.
    pub(crate) opened: u64,
    /// Segments an outside tool renamed, by the file name they were found under (in the same
    /// directory).
    #[serde(default)]
    pub(crate) moved: BTreeMap<u64, String>,
    /// Segments whose records are gone from where Drover can read them (moved out of the
    /// directory, deleted, or copied away and truncated), with their length when known.
    #[serde(default)]
    pub(crate) lost: BTreeMap<u64, u64>,
    /// Length of the current segment at the last clean close: after a clean stop nothing past
    /// it is owed to anyone, so losing the file while stopped loses nothing.
    #[serde(default)]
    pub(crate) clean_len: Option<u64>,
}

/// Names of the files of one accounting log.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) path: PathBuf,
    pub(crate) dir: PathBuf,
    name: String,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Layout {
    pub(crate) fn new(path: &Path) -> Layout {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_owned);
        let name = path.file_name().map_or_else(
            || "accounting.jsonl".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        Layout {
            path: path.to_owned(),
            dir,
            name,
        }
    }

    pub(crate) fn manifest_path(&self) -> PathBuf {
        self.dir.join(format!(".{}.segments", self.name))
    }

    /// `<path>.<sequence>`: six digits so that `ls` sorts them.
    pub(crate) fn closed_path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{}.{segment:06}", self.name))
    }

    /// The CSV copy of the current segment (`acct.csv` beside the log).
    pub(crate) fn csv_path(&self) -> PathBuf {
        self.dir.join("acct.csv")
    }

    /// A closed segment's CSV copy: `acct-<sequence>.csv`, as PowerMTA-era tooling globs it.
    pub(crate) fn closed_csv_path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("acct-{segment:06}.csv"))
    }

    pub(crate) fn compressed_path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{}.{segment:06}.zst", self.name))
    }

    /// The sequence number in a closed segment's file name, and whether it is compressed.
    fn parse_closed(&self, file_name: &str) -> Option<(u64, bool)> {
        let rest = file_name.strip_prefix(&self.name)?.strip_prefix('.')?;
        let (digits, compressed) = match rest.strip_suffix(".zst") {
            Some(d) => (d, true),
            None => (rest, false),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((digits.parse().ok()?, compressed))
    }

    /// Closed segments in the directory under Drover's names: sequence → (file, compressed).
    /// A segment present both plain and compressed (a compression interrupted by a crash)
    /// is listed plain: the compressed copy may be incomplete.
    pub(crate) fn closed(&self) -> std::io::Result<BTreeMap<u64, (PathBuf, bool)>> {
        let mut out: BTreeMap<u64, (PathBuf, bool)> = BTreeMap::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Some((seq, compressed)) = self.parse_closed(&name) {
                let keep_existing = out.get(&seq).is_some_and(|(_, c)| !*c);
                if !keep_existing {
                    out.insert(seq, (entry.path(), compressed));
                }
            }
        }
        Ok(out)
    }

    /// A file in the directory with this inode, if any (where an outside `mv` put a segment).
    pub(crate) fn find_inode(&self, device: u64, inode: u64) -> std::io::Result<Option<PathBuf>> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if let Ok(meta) = entry.metadata() {
                if meta.is_file() && meta.ino() == inode && meta.dev() == device {
                    return Ok(Some(entry.path()));
                }
            }
        }
        Ok(None)
    }

    pub(crate) fn load_manifest(&self) -> std::io::Result<Option<Manifest>> {
        match std::fs::read(self.manifest_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", self.manifest_path().display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Replaces the manifest atomically (write, sync, rename, sync the directory).
    pub(crate) fn store_manifest(&self, manifest: &Manifest) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{}.segments.tmp", self.name));
        let mut file = File::create(&tmp)?;
        file.write_all(&serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, self.manifest_path())?;
        sync_dir(&self.dir)
    }

    /// Where the records of `segment` can be read now: the current file, a closed file
    /// under Drover's name (plain first), or where an outside tool moved it.
    pub(crate) fn locate(
        &self,
        segment: u64,
        manifest: &Manifest,
    ) -> std::io::Result<Option<(PathBuf, bool)>> {
        if segment == manifest.current {
            return Ok(Some((self.path.clone(), false)));
        }
        let plain = self.closed_path(segment);
        if plain.exists() {
            return Ok(Some((plain, false)));
        }
        let compressed = self.compressed_path(segment);
        if compressed.exists() {
            return Ok(Some((compressed, true)));
        }
        if let Some(name) = manifest.moved.get(&segment) {
            let moved = self.dir.join(name);
            if moved.exists() {
                let compressed = name.ends_with(".zst");
                return Ok(Some((moved, compressed)));
            }
        }
        Ok(None)
    }
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

pub(crate) fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// The state of the log found at open: the file to append to and the manifest in force.
pub(crate) struct Opened {
    pub(crate) file: File,
    pub(crate) manifest: Manifest,
}

/// Opens the log at `layout.path`, adopting what an outside tool did while Drover was
/// stopped: the single-file layout of earlier versions becomes segment 0; a current file
/// renamed away is recorded as closed (under the name found, or lost if it left the
/// directory); a file found at `path` that is not the one remembered starts a new segment.
pub(crate) fn open(layout: &Layout) -> std::io::Result<Opened> {
    std::fs::create_dir_all(&layout.dir)?;
    let manifest = layout.load_manifest()?;
    let at_path = match std::fs::metadata(&layout.path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let mut manifest = match manifest {
        Some(m) => m,
        None => {
            // No manifest: a new log, or the single file of earlier versions (segment 0,
            // which is what their 8-byte checkpoint names).
            let next = layout
                .closed()?
                .keys()
                .next_back()
                .map_or(0, |last| last + 1);
            let file = open_append(&layout.path)?;
            let meta = file.metadata()?;
            let manifest = Manifest {
                current: next,
                inode: meta.ino(),
                device: meta.dev(),
                opened: now_secs(),
                ..Manifest::default()
            };
            layout.store_manifest(&manifest)?;
            return Ok(Opened { file, manifest });
        }
    };
    let same_file =
        at_path.is_some_and(|m| m.ino() == manifest.inode && m.dev() == manifest.device);
    if same_file {
        let file = open_append(&layout.path)?;
        let len = file.metadata()?.len();
        if manifest.clean_len.is_some_and(|clean| len < clean) {
            // Truncated while stopped (copytruncate): what was there went with the copy.
            tracing::warn!(
                path = %layout.path.display(),
                segment = manifest.current,
                "the accounting file was truncated while Drover was stopped; its records start a new segment"
            );
            let lost_len = manifest.clean_len.unwrap_or(0);
            manifest.lost.insert(manifest.current, lost_len);
            manifest.current += 1;
            manifest.opened = now_secs();
        }
        manifest.clean_len = None;
        layout.store_manifest(&manifest)?;
        return Ok(Opened { file, manifest });
    }
    // The remembered current file is not at `path`: renamed (by Drover's own rotation that a
    // crash interrupted, or by an outside tool) or gone.
    close_moved(layout, &mut manifest)?;
    let file = open_append(&layout.path)?;
    let meta = file.metadata()?;
    manifest.current += 1;
    manifest.inode = meta.ino();
    manifest.device = meta.dev();
    manifest.opened = now_secs();
    manifest.clean_len = None;
    layout.store_manifest(&manifest)?;
    Ok(Opened { file, manifest })
}

/// Records where the current segment went after it left `path` (not yet stored).
pub(crate) fn close_moved(layout: &Layout, manifest: &mut Manifest) -> std::io::Result<()> {
    let segment = manifest.current;
    match layout.find_inode(manifest.device, manifest.inode)? {
        Some(found) if found == layout.closed_path(segment) => {}
        Some(found) => {
            let name = found
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            tracing::warn!(
                segment,
                file = %found.display(),
                "the accounting file was renamed by another program; reading segment {segment} from there"
            );
            manifest.moved.insert(segment, name);
        }
        None => {
            if !layout.closed_path(segment).exists() && !layout.compressed_path(segment).exists() {
                tracing::error!(
                    segment,
                    path = %layout.path.display(),
                    "the accounting file was moved out of its directory or deleted; its records are no longer readable by Drover"
                );
                manifest
                    .lost
                    .insert(segment, manifest.clean_len.unwrap_or(u64::MAX));
            }
        }
    }
    Ok(())
}

/// Compresses a closed segment to `<path>.<n>.zst` and removes the plain file. Readers that
/// have the plain file open keep reading it; new readers find one or the other.
pub(crate) fn compress(layout: &Layout, segment: u64) -> std::io::Result<()> {
    compress_file(&layout.closed_path(segment))
}

/// Compresses `plain` to `<plain>.zst` (through a temporary file, synced) and removes it.
pub(crate) fn compress_file(plain: &Path) -> std::io::Result<()> {
    let name = plain
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = plain.parent().unwrap_or_else(|| Path::new("."));
    let target = dir.join(format!("{name}.zst"));
    let tmp = dir.join(format!(".{name}.zst.tmp"));
    {
        let mut input = File::open(plain)?;
        let output = File::create(&tmp)?;
        let mut encoder = zstd::Encoder::new(output, 3)?;
        std::io::copy(&mut input, &mut encoder)?;
        let output = encoder.finish()?;
        output.sync_all()?;
    }
    std::fs::rename(&tmp, &target)?;
    sync_dir(dir)?;
    std::fs::remove_file(plain)?;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_segment_names_are_recognised() {
        let layout = Layout::new(Path::new("/var/drover/accounting.jsonl"));
        assert_eq!(
            layout.parse_closed("accounting.jsonl.000012"),
            Some((12, false))
        );
        assert_eq!(
            layout.parse_closed("accounting.jsonl.7.zst"),
            Some((7, true))
        );
        assert_eq!(layout.parse_closed("accounting.jsonl"), None);
        assert_eq!(layout.parse_closed("accounting.jsonl.1.gz"), None);
        assert_eq!(layout.parse_closed("accounting.jsonlx.1"), None);
        assert_eq!(layout.parse_closed("accounting.jsonl."), None);
        assert_eq!(
            layout.closed_path(3),
            PathBuf::from("/var/drover/accounting.jsonl.000003")
        );
    }

    #[test]
    fn the_single_file_of_earlier_versions_becomes_segment_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounting.jsonl");
        std::fs::write(&path, "{}\n").unwrap();
        let layout = Layout::new(&path);
        let opened = open(&layout).unwrap();
        assert_eq!(opened.manifest.current, 0);
        assert_eq!(layout.load_manifest().unwrap(), Some(opened.manifest));
    }

    #[test]
    fn an_outside_rename_while_stopped_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accounting.jsonl");
        let layout = Layout::new(&path);
        let first = open(&layout).unwrap();
        drop(first.file);
        std::fs::write(&path, "{\"a\":1}\n").unwrap();
        // A logrotate-style rename, then a fresh file created at the path.
        std::fs::rename(&path, dir.path().join("accounting.jsonl.1")).unwrap();
        std::fs::write(&path, "").unwrap();
        let second = open(&layout).unwrap();
        assert_eq!(second.manifest.current, 1);
        assert_eq!(
            second.manifest.moved.get(&0).map(String::as_str),
            Some("accounting.jsonl.1")
        );
        let (found, compressed) = layout.locate(0, &second.manifest).unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(found).unwrap(), "{\"a\":1}\n");
        assert!(!compressed);
        // Moved out of the directory: recorded as lost, not silently mis-read.
        drop(second.file);
        std::fs::remove_file(&path).unwrap();
        let third = open(&layout).unwrap();
        assert_eq!(third.manifest.current, 2);
        assert!(third.manifest.lost.contains_key(&1));
        assert!(layout.locate(1, &third.manifest).unwrap().is_none());
    }

    #[test]
    fn compression_replaces_the_plain_segment() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(&dir.path().join("a.jsonl"));
        std::fs::write(layout.closed_path(4), "{\"x\":1}\n".repeat(1000)).unwrap();
        compress(&layout, 4).unwrap();
        assert!(!layout.closed_path(4).exists());
        let closed = layout.closed().unwrap();
        assert_eq!(closed.get(&4).map(|(_, c)| *c), Some(true));
        let text = zstd::decode_all(File::open(layout.compressed_path(4)).unwrap()).unwrap();
        assert_eq!(text.len(), 8000);
    }
}
