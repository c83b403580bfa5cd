//! Where saved pages go: a [`PageSink`] takes page-aligned runs at their image offsets, in
//! any order, from several threads at once, each offset once per snapshot. A write that
//! faulted waits for the sink's `write` of its page, so a sink must not block for long:
//! the page cache of a local file is right ([`FileSink`]); a network upload belongs behind
//! it (write the file, then push it as a chunked image).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use pager::is_zero;

/// A destination for saved pages (see the module docs).
pub trait PageSink: Send + Sync {
    /// Stores `data` at image offset `offset`; both are multiples of the page size.
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
}

/// Granule of zero detection: all-zero 4 KiB pieces are left as holes.
const ZERO_GRANULE: usize = 4096;

/// A raw image file: a fresh sparse file of the image's length, all-zero pages left as
/// holes (`SEEK_HOLE` finds them, so `pager::FileSource::sparse` and `chunked` push skip
/// them). Written with `pwrite(2)`, which several threads may do at once.
#[derive(Debug)]
pub struct FileSink {
    file: File,
    path: PathBuf,
}

impl FileSink {
    /// Creates (or truncates) `path` as a sparse file of `len` bytes, 0600: it holds
    /// guest memory. A link, a FIFO or a hard-linked file at `path` is refused, not
    /// written through (see [`uffd_core::private_fs::create_private`]).
    pub fn create(path: impl AsRef<Path>, len: u64) -> Result<FileSink> {
        let path = path.as_ref().to_path_buf();
        let file =
            uffd_core::private_fs::create_private(&path).map_err(|source| Error::Private {
                what: "create the snapshot file",
                source,
            })?;
        Self::from_file(file, path, len)
    }

    /// A sink writing into `file` (new and empty, e.g. from
    /// [`uffd_core::private_fs::create_temp_in`]) at `path`, sized to `len` bytes.
    pub fn from_file(file: File, path: PathBuf, len: u64) -> Result<FileSink> {
        file.set_len(len).map_err(Error::io("size", &path))?;
        Ok(FileSink { file, path })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes the file to its device (`fsync(2)`).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(Error::io("sync", &self.path))
    }
}

impl PageSink for FileSink {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut run: Option<usize> = None; // start of the current non-zero run
        for (i, piece) in data.chunks(ZERO_GRANULE).enumerate() {
            let at = i * ZERO_GRANULE;
            match (is_zero(piece), run) {
                (false, None) => run = Some(at),
                (true, Some(start)) => {
                    self.file
                        .write_all_at(&data[start..at], offset + start as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            self.file
                .write_all_at(&data[start..], offset + start as u64)?;
        }
        Ok(())
    }
}

/// An image held in memory (for tests and small regions).
#[derive(Debug)]
pub struct MemorySink {
    bytes: Mutex<Vec<u8>>,
}

impl MemorySink {
    /// `len` bytes of zeros, to be overwritten by saved pages.
    pub fn new(len: usize) -> Self {
        Self {
            bytes: Mutex::new(vec![0; len]),
        }
    }

    /// The image.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the image so far.
    pub fn to_vec(&self) -> Vec<u8> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl PageSink for MemorySink {
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let start = usize::try_from(offset)
            .ok()
            .filter(|&s| s.checked_add(data.len()).is_some_and(|e| e <= bytes.len()))
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{} bytes at {offset:#x} do not fit an image of {}",
                        data.len(),
                        bytes.len()
                    ),
                )
            })?;
        bytes[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sink_leaves_zero_pages_as_holes() {
        let path = std::env::temp_dir().join(format!("snapshot-sink-{}", std::process::id()));
        let sink = FileSink::create(&path, 64 << 10).unwrap();
        let mut data = vec![0u8; 16 << 10];
        data[4096..8192].fill(1); // page 1 of the run
        data[12288] = 2; // page 3
        sink.write(32 << 10, &data).unwrap();
        let holes = chunked::holes(&sink.file, 64 << 10).unwrap();
        let back = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&back[32 << 10..48 << 10], &data[..]);
        assert!(
            holes
                .iter()
                .any(|h| h.start <= 32 << 10 && h.end >= 36 << 10),
            "page 0 of the run is a hole: {holes:?}"
        );
        assert!(
            !holes.iter().any(|h| h.start < 37 << 10 && h.end > 36 << 10),
            "page 1 is data: {holes:?}"
        );
    }

    #[test]
    fn a_memory_sink_refuses_writes_past_its_end() {
        let sink = MemorySink::new(8192);
        sink.write(4096, &[1; 4096]).unwrap();
        assert!(sink.write(8192, &[1; 4096]).is_err());
        assert_eq!(sink.into_bytes()[4096], 1);
    }
}
