//! Working sets: the order in which pages were first faulted on one run, recorded while
//! the pager serves (lock-free, so the SIGBUS handler records too) and replayed first by
//! the prefetcher on the next run (the REAP idea).
//!
//! File format: the magic `UFWS0001`, a little-endian `u64` count, then that many
//! little-endian `u64` page indices.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use uffd_core::private_fs::{create_temp_for, open_regular, FsError};

pub use crate::error::RecordingError;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"UFWS0001";

fn bad(path: &Path) -> impl FnOnce(RecordingError) -> Error + '_ {
    move |problem| Error::BadRecording {
        path: path.to_path_buf(),
        problem,
    }
}

/// A refusal as such; a failed system call as the kernel's answer (the error around it
/// names the file already).
fn refused(e: FsError) -> RecordingError {
    match e {
        FsError::Io { source, .. } => RecordingError::Io(source),
        e => RecordingError::Refused(e),
    }
}

/// Writes `pages` as a working-set file, 0600 and atomically: into a new temporary file
/// of an unguessable name beside it (`O_EXCL | O_NOFOLLOW`), renamed over `path` once
/// complete. Whatever sits at `path` must be a regular file of ours: a link planted
/// there (a shared directory) is refused, never followed, and so is another user's file
/// (see [`uffd_core::private_fs::create_temp_for`]).
pub fn save(path: &Path, pages: &[u64]) -> Result<()> {
    let mut out = Vec::with_capacity(16 + pages.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    for p in pages {
        out.extend_from_slice(&p.to_le_bytes());
    }
    let (mut file, tmp) = create_temp_for(path).map_err(|e| bad(path)(refused(e)))?;
    let written = file
        .write_all(&out)
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        // Nothing partial is left behind; the removal failing too changes nothing.
        let _ = std::fs::remove_file(&tmp);
        return Err(bad(path)(e.into()));
    }
    Ok(())
}

/// Checks that [`save`] could write a working-set file at `path` (its directory exists
/// and is writable, nothing but a file of ours sits at the path), without leaving
/// anything behind: for callers that must refuse a bad `--record` path before they start
/// serving.
pub fn check_writable(path: &Path) -> Result<()> {
    let (_, tmp) = create_temp_for(path).map_err(|e| bad(path)(refused(e)))?;
    std::fs::remove_file(&tmp).map_err(|e| bad(path)(e.into()))
}

/// Reads a working-set file, refusing anything malformed or naming pages beyond `pages`,
/// and anything but a regular file (a FIFO at the path is refused, not waited on).
pub fn load(path: &Path, pages: usize) -> Result<Vec<u64>> {
    let mut bytes = Vec::new();
    let file = open_regular(path, false).map_err(|e| bad(path)(refused(e)))?;
    (&file)
        .read_to_end(&mut bytes)
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
    fn a_saved_working_set_is_private_and_reads_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = uffd_core::private_fs::TempDir::new("record-").unwrap();
        let path = dir.path().join("ws.bin");
        save(&path, &[3, 1, 2]).unwrap();
        save(&path, &[5, 4]).unwrap(); // over the last one
        assert_eq!(load(&path, 8).unwrap(), vec![5, 4]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn a_link_planted_at_the_path_is_refused_never_written_through() {
        let dir = uffd_core::private_fs::TempDir::new("record-").unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.path().join("ws.bin");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        // The temporary name of old, fixed and guessable, planted too.
        std::os::unix::fs::symlink(&victim, path.with_extension("tmp-ufws")).unwrap();
        assert_refused(save(&path, &[1]));
        assert_refused(check_writable(&path));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_symlink());
    }

    #[test]
    fn a_fifo_at_the_replay_path_is_refused_not_waited_on() {
        let dir = uffd_core::private_fs::TempDir::new("record-").unwrap();
        let fifo = dir.path().join("ws.bin");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_refused(load(&fifo, 8));
    }

    /// The path was refused before a byte was read or written.
    fn assert_refused<T: std::fmt::Debug>(r: Result<T>) {
        let e = r.expect_err("refused");
        assert!(
            matches!(
                &e,
                Error::BadRecording {
                    problem: RecordingError::Refused(_),
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn errors_name_the_file() {
        let path = Path::new("/nonexistent-dir/ws.bin");
        let e = load(path, 10).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent-dir/ws.bin"), "{e}");
        assert!(check_writable(path).is_err());
    }
}
