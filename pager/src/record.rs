//! Working sets: the order in which pages were first faulted on one run, recorded while
//! the pager serves (lock-free, so the SIGBUS handler records too) and replayed first by
//! the prefetcher on the next run (the REAP idea).
//!
//! File format: the magic `UFWS0001`, a little-endian `u64` count, then that many
//! little-endian `u64` page indices.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

pub use crate::error::RecordingError;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"UFWS0001";

fn bad(path: &Path) -> impl FnOnce(RecordingError) -> Error + '_ {
    move |problem| Error::BadRecording {
        path: path.to_path_buf(),
        problem,
    }
}

/// Writes `pages` as a working-set file (atomically: a temporary file renamed over it).
pub fn save(path: &Path, pages: &[u64]) -> Result<()> {
    let mut out = Vec::with_capacity(16 + pages.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    let tmp = path.with_extension("tmp-ufws");
    std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&out))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| bad(path)(e.into()))
}

/// Checks that a working-set file can be written at `path` (its directory exists and is
/// writable), without leaving anything behind: for callers that must refuse a bad
/// `--record` path before they start serving.
pub fn check_writable(path: &Path) -> Result<()> {
    let tmp = path.with_extension("tmp-ufws");
    std::fs::File::create(&tmp)
        .and_then(|_| std::fs::remove_file(&tmp))
        .map_err(|e| bad(path)(e.into()))
}

/// Reads a working-set file, refusing anything malformed or naming pages beyond `pages`.
pub fn load(path: &Path, pages: usize) -> Result<Vec<u64>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| bad(path)(e.into()))?;
    parse(&bytes, pages).map_err(bad(path))
}

/// Decodes a working-set file's bytes.
fn parse(bytes: &[u8], pages: usize) -> Result<Vec<u64>, RecordingError> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return Err(RecordingError::NotAWorkingSet);
    }
    let count = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let body = &bytes[16..];
    if body.len() as u64 != count.saturating_mul(8) {
        return Err(RecordingError::Truncated {
            count,
            bytes: body.len(),
        });
    }
    let list: Vec<u64> = body
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    if let Some(&page) = list.iter().find(|&&p| p >= pages as u64) {
        return Err(RecordingError::PageBeyond { page, pages });
    }
    Ok(list)
}

/// The order of first faults. Lock-free and allocation-free after creation, so the SIGBUS
/// path can record too: one slot per page (a page is requested once unless its claim is
/// given back; requests beyond capacity are dropped).
pub(crate) struct Recorder {
    slots: Box<[AtomicU64]>,
    len: AtomicUsize,
}

impl Recorder {
    pub fn new(pages: usize) -> Self {
        Self {
            slots: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            len: AtomicUsize::new(0),
        }
    }

    /// Appends `page`. Relaxed: readers take a snapshot only after the threads are joined.
    pub fn record(&self, page: usize) {
        let i = self.len.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.slots.get(i) {
            slot.store(page as u64, Ordering::Relaxed);
        }
    }

    /// The pages recorded, in order.
    pub fn pages(&self) -> Vec<u64> {
        let n = self.len.load(Ordering::Relaxed).min(self.slots.len());
        self.slots[..n]
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_files_are_refused_with_what_is_wrong() {
        assert!(matches!(
            parse(b"nope", 10),
            Err(RecordingError::NotAWorkingSet)
        ));
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&2u64.to_le_bytes());
        f.extend_from_slice(&3u64.to_le_bytes());
        assert!(matches!(
            parse(&f, 10),
            Err(RecordingError::Truncated { count: 2, bytes: 8 })
        ));
        f.extend_from_slice(&12u64.to_le_bytes());
        assert!(matches!(
            parse(&f, 10),
            Err(RecordingError::PageBeyond {
                page: 12,
                pages: 10
            })
        ));
        assert_eq!(parse(&f, 13).expect("valid"), vec![3, 12]);
    }

    #[test]
    fn errors_name_the_file() {
        let path = Path::new("/nonexistent-dir/ws.bin");
        let e = load(path, 10).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent-dir/ws.bin"), "{e}");
        assert!(check_writable(path).is_err());
    }
}
