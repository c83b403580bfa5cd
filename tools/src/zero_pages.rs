//! A memory file's zero pages placed as zero pages, never copied.
//!
//! Firecracker writes a full snapshot's memory file fully allocated: a guest's untouched
//! and freed pages are 4 KiB of zeros on disk, and copying them into the guest costs a
//! read, a copy and a page of host memory each, where `UFFDIO_ZEROPAGE` maps the shared
//! zero page for nothing. Two ways to know a page is zero: the file's holes
//! (`SEEK_DATA`/`SEEK_HOLE`, learnt once at open: never read), and a check of the bytes as
//! they are read, before they are copied. The check reads bytes the copy would read
//! anyway and stops at the first non-zero 64 bytes, so a data page costs almost nothing
//! more and a zero page saves the copy and the allocation (README, "Zero pages").
//!
//! A run placed at once (fault-around, readahead) is checked whole: all zero, it is one
//! zero-page placement; with any data in it, it is copied as it is.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use pager::{is_zero, Fetched, FileSource, Placer, Source, SourceError};

/// A source whose all-zero pages are answered [`Fetched::Zero`], and whose file holes are
/// known zero up front; counts what it found.
pub struct ZeroChecked {
    inner: Arc<dyn Source>,
    holes: Vec<Range<u64>>,
    /// Bytes answered zero by the check (Relaxed: a statistic; safe in a signal handler).
    found: AtomicU64,
}

impl ZeroChecked {
    /// A plain memory file: read with `pread(2)`, its holes learnt with `SEEK_HOLE`. Not
    /// through a mapping: the check reads the bytes here, and a file truncated under the
    /// handler would raise SIGBUS for the pages it lost (the handler died, the VMM read
    /// zeros); a read short of the file's first length fails the restore instead.
    pub fn file(path: &Path) -> Result<ZeroChecked> {
        let inner = FileSource::sparse(path)
            .with_context(|| format!("open {} and find its holes", path.display()))?;
        Ok(ZeroChecked {
            holes: inner.holes().to_vec(),
            inner: Arc::new(inner),
            found: AtomicU64::new(0),
        })
    }

    /// Any local source (a diff-snapshot chain): its own zero ranges, plus the check.
    pub fn over(inner: Arc<dyn Source>) -> ZeroChecked {
        ZeroChecked {
            inner,
            holes: Vec::new(),
            found: AtomicU64::new(0),
        }
    }

    /// Bytes of the file's holes (known zero, never read).
    pub fn hole_bytes(&self) -> u64 {
        self.holes.iter().map(|h| h.end - h.start).sum()
    }

    /// Bytes the check found all zero (read, then placed as zero pages).
    pub fn found_bytes(&self) -> u64 {
        self.found.load(Ordering::Relaxed)
    }
}

impl Source for ZeroChecked {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn fetch<'a>(&'a self, offset: u64, scratch: &'a mut [u8]) -> Result<Fetched<'a>, SourceError> {
        match self.inner.fetch(offset, scratch)? {
            Fetched::Data(bytes) if is_zero(bytes) => {
                self.found.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(Fetched::Zero)
            }
            other => Ok(other),
        }
    }

    fn zero_ranges(&self) -> Vec<Range<u64>> {
        self.inner.zero_ranges() // a file's holes among them (`FileSource::sparse`)
    }

    fn attach(&self, placer: Placer) {
        self.inner.attach(placer)
    }

    fn prioritize(&self, offset: u64) {
        self.inner.prioritize(offset)
    }

    fn signal_safe(&self) -> Option<pager::SignalSafe> {
        // The check reads memory and bumps an atomic: nothing more than the inner fetch,
        // whose promise is this one.
        self.inner.signal_safe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_zero_pages_are_answered_zero_and_counted() {
        let mut bytes = vec![0u8; 4 * 4096];
        bytes[4096 + 5] = 9; // page 1 has data
        let source = ZeroChecked::over(Arc::new(pager::MemorySource::new(bytes)));
        let mut scratch = vec![0u8; 4096];
        assert!(matches!(source.fetch(0, &mut scratch), Ok(Fetched::Zero)));
        assert!(matches!(source.fetch(4096, &mut scratch), Ok(Fetched::Data(d)) if d[5] == 9));
        let mut run = vec![0u8; 2 * 4096];
        assert!(matches!(
            source.fetch(2 * 4096, &mut run),
            Ok(Fetched::Zero)
        ));
        assert_eq!(source.found_bytes(), 3 * 4096);
    }
}
