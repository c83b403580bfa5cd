//! The host's shared chunk cache: a directory of verified chunks, named by digest,
//! bounded in bytes, shared by every restoring process.
//!
//! - **Atomic publish**: a chunk is written to a temporary file and renamed into place, so
//!   a reader sees a whole chunk or none. Two processes publishing the same chunk write the
//!   same bytes; the second rename replaces the first harmlessly.
//! - **Verified on read**: a cached chunk is hashed before it is used; one that does not
//!   match its name (a torn disk, a meddler) is deleted and fetched again.
//! - **Fetched once per host**: before fetching a chunk from the store a process takes a
//!   byte-range lock (`F_OFD_SETLK`) on a slot of a shared lock file picked by the digest; a
//!   second process finding it taken waits for the chunk to appear instead of fetching it
//!   too. A process that dies drops its locks with its file descriptions.
//! - **Bounded, least recently used first**: a hit refreshes the file's modification time;
//!   when the cache outgrows its bound, whichever process notices evicts the oldest files
//!   (under an exclusive `flock` so two processes do not evict at once) down to 90 %.
//!   Evicting a chunk another process is reading is safe: its open file stays readable.
//!   Sizes are the blocks files take, so a sparse file cannot inflate the count.
//! - **Nobody else's**: the directory and its path are checked on open (owned by us,
//!   writable by nobody else — `uffd_core::private_fs`), directories are created 0700
//!   and files 0600, and every file is reached relative to the checked directory fds
//!   without following links; temporary names are unguessable and created `O_EXCL`; anything
//!   but a regular file where a chunk should be is removed, not opened. So another local
//!   user can neither redirect what we write or delete, nor read guest memory, nor hold
//!   a lock that makes us wait.
//!
//! Here the cache's opening, reads and publishing; `lock.rs` the fetch lock, `evict.rs`
//! the bound (eviction) and the reclaiming of dead writers' files.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use uffd_core::private_fs::{FsError, PrivateDir};

use crate::error::{Error, Result};
use crate::hash::Digest;

mod evict;
mod lock;
#[cfg(test)]
mod tests;

pub(crate) use lock::FetchLock;


/// A chunk cache directory (see the module docs).
#[derive(Debug)]
pub struct ChunkCache {
    /// The cache directory, checked to be ours and held open: every file below is
    /// reached relative to it (or to `chunks`, `tmp`), never through a path again.
    dir: PrivateDir,
    /// `chunks/`: one fan-out directory per first digest byte.
    chunks: PrivateDir,
    /// `chunks/tmp/`: chunks being written, before their rename into place.
    tmp: PrivateDir,
    capacity: u64,
    /// Bytes in the cache as this process last counted them, plus what it added since.
    used: AtomicU64,
    /// One open file description for every fetch lock this process holds.
    locks: File,
    hits: AtomicU64,
    misses: AtomicU64,
    evicted: AtomicU64,
}

/// Counters of a cache, for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Chunks served from the cache.
    pub hits: u64,
    /// Chunks looked up and not found (or found corrupt).
    pub misses: u64,
    /// Chunks this process evicted.
    pub evicted: u64,
    /// Bytes in the cache, as last counted.
    pub used: u64,
}
fn private(what: &'static str) -> impl FnOnce(FsError) -> Error {
    move |source| Error::Private { what, source }
}

/// Bytes a chunk of `len` bytes takes on disk, as [`private_fs::allocated_bytes`](uffd_core::private_fs::allocated_bytes) will
/// count it later (whole 4 KiB blocks).
fn on_disk(len: usize) -> u64 {
    (len as u64).next_multiple_of(4096)
}

impl ChunkCache {
    /// The default cache directory: `/var/cache/uffdkit` for root, else
    /// `$XDG_CACHE_HOME/uffdkit` (or `~/.cache/uffdkit`). `None` if neither is known.
    /// Never a shared directory such as `/var/tmp`, where another user could create it
    /// first.
    pub fn default_dir() -> Option<PathBuf> {
        if nix::unistd::geteuid().is_root() {
            return Some(PathBuf::from("/var/cache/uffdkit"));
        }
        let xdg = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute());
        let home = || {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".cache"))
        };
        Some(xdg.or_else(home)?.join("uffdkit"))
    }

    /// Opens (creating if needed) the cache at `dir`, bounded to `capacity` bytes.
    ///
    /// The directory and each component of its path are checked first (see
    /// [`PrivateDir::open_or_create`]): a cache another user owns, or could change, is
    /// refused with [`Error::Private`] naming the culprit.
    pub fn open(dir: impl Into<PathBuf>, capacity: u64) -> Result<Self> {
        let dir = PrivateDir::open_or_create(&dir.into()).map_err(private("open the cache"))?;
        let chunks = dir.subdir("chunks").map_err(private("open the cache"))?;
        let tmp = chunks.subdir("tmp").map_err(private("open the cache"))?;
        // Ours and 0600: no other user can open it, so no other user can
        // hold a lock in it and make us wait.
        let locks = dir
            .open_or_create_file("fetch.lock")
            .map_err(private("open the cache's lock file"))?;
        let cache = Self {
            dir,
            chunks,
            tmp,
            capacity,
            used: AtomicU64::new(0),
            locks,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        };
        cache.reclaim_orphans();
        let (_, entries) = cache.entries()?;
        let used = entries.iter().map(|e| e.bytes).sum();
        cache.used.store(used, Ordering::Relaxed);
        Ok(cache)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The bound in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Counters so far.
    pub fn stats(&self) -> CacheStats {
        // Relaxed: counters for reports, read after the work they count.
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evicted: self.evicted.load(Ordering::Relaxed),
            used: self.used.load(Ordering::Relaxed),
        }
    }

    /// Where chunk `digest` lives (for messages and tests; the cache itself never opens
    /// this path, only names relative to its checked directories).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.chunks.path().join(&hex[..2]).join(hex)
    }

    /// The chunk named `digest` of `len` bytes, if cached and intact.
    pub fn get(&self, digest: &Digest, len: usize) -> Option<Vec<u8>> {
        let found = self.read_verified(digest, len);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// The fan-out directory of `digest`, if it exists and is ours.
    fn fan_out(&self, hex: &str) -> Option<PrivateDir> {
        match self.chunks.existing_subdir(OsStr::new(&hex[..2])) {
            Ok(dir) => dir,
            Err(e) => {
                log::warn!("cache: {e}; not using it");
                None
            }
        }
    }

    /// Opens the cached file of `digest`: never through a link, never waiting on a FIFO.
    /// Anything but a regular file there is removed (it is not a chunk of ours).
    fn open_chunk(&self, digest: &Digest) -> Option<File> {
        let hex = digest.to_hex();
        let dir = self.fan_out(&hex)?;
        match dir.open_file(&hex) {
            Ok(file) => Some(file),
            Err(FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                None
            }
            Err(e) => {
                log::warn!("cache: {e}; dropping it");
                let _ = dir.remove(OsStr::new(&hex));
                None
            }
        }
    }

    fn read_verified(&self, digest: &Digest, len: usize) -> Option<Vec<u8>> {
        let mut file = self.open_chunk(digest)?;
        let mut data = Vec::with_capacity(len);
        // One byte more than expected tells a longer file from a right one.
        let read = (&mut file).take(len as u64 + 1).read_to_end(&mut data);
        if read.is_err() || data.len() != len || Digest::of(&data) != *digest {
            log::warn!("cache: {} is corrupt; dropping it", self.path(digest).display());
            let hex = digest.to_hex();
            if let Some(dir) = self.fan_out(&hex) {
                let _ = dir.remove(OsStr::new(&hex));
            }
            return None;
        }
        // A hit is a use: the LRU order is the files' modification times.
        let _ = nix::sys::stat::futimens(
            file.as_fd(),
            &nix::sys::time::TimeSpec::UTIME_NOW,
            &nix::sys::time::TimeSpec::UTIME_NOW,
        );
        Some(data)
    }

    /// Whether the chunk is present (not verified).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.open_chunk(digest).is_some()
    }
    /// Publishes a verified chunk: written to a new file of an unguessable name (0600,
    /// `O_EXCL`), then renamed into place relative to the checked directories.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        if self.contains(digest) {
            return Ok(());
        }
        let hex = digest.to_hex();
        let dir = self.chunks.subdir(&hex[..2]).map_err(private("publish to cache"))?;
        let (mut file, tmp) = self
            .tmp
            // The PID in the name lets a later open reclaim it if we die before the rename.
            .create_temp(&format!("{hex}.{}.", std::process::id()))
            .map_err(private("publish to cache"))?;
        let written = file
            .write_all(data)
            .map_err(Error::io("publish to cache", self.path(digest).display()))
            .and_then(|()| {
                self.tmp
                    .rename(&tmp, &dir, &hex)
                    .map_err(private("publish to cache"))
            });
        if let Err(e) = written {
            let _ = self.tmp.remove(OsStr::new(&tmp));
            return Err(e);
        }
        let size = on_disk(data.len());
        let used = self.used.fetch_add(size, Ordering::Relaxed) + size;
        if used > self.capacity {
            self.evict()?;
        }
        Ok(())
    }
}
