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

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use nix::fcntl::{fcntl, FcntlArg};

use crate::error::{Error, Result};
use crate::hash::Digest;

/// Slots in the fetch-lock file: digests share a slot rarely, and sharing one only
/// serialises two fetches.
const LOCK_SLOTS: u64 = 1 << 20;

/// A chunk cache directory (see the module docs).
#[derive(Debug)]
pub struct ChunkCache {
    dir: PathBuf,
    capacity: u64,
    /// Bytes in the cache as this process last counted them, plus what it added since.
    used: AtomicU64,
    /// One open file description for every fetch lock this process holds.
    locks: File,
    /// Names temporary files uniquely within this process.
    seq: AtomicU64,
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

/// Whether a fetch lock was taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FetchLock {
    /// This process fetches the chunk; [`ChunkCache::unlock`] when published.
    Ours(u64),
    /// Another process is fetching it: wait for it to appear.
    Peer,
}

impl ChunkCache {
    /// Opens (creating if needed) the cache at `dir`, bounded to `capacity` bytes.
    pub fn open(dir: impl Into<PathBuf>, capacity: u64) -> Result<Self> {
        let dir = dir.into();
        let chunks = dir.join("chunks");
        std::fs::create_dir_all(chunks.join("tmp"))
            .map_err(Error::io("create cache", chunks.display()))?;
        let lock_path = dir.join("fetch.lock");
        let locks = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(Error::io("open", lock_path.display()))?;
        let cache = Self {
            dir,
            capacity,
            used: AtomicU64::new(0),
            locks,
            seq: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        };
        let used = cache.entries()?.iter().map(|e| e.1).sum();
        cache.used.store(used, Ordering::Relaxed);
        Ok(cache)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
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

    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.dir.join("chunks").join(&hex[..2]).join(hex)
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

    fn read_verified(&self, digest: &Digest, len: usize) -> Option<Vec<u8>> {
        let path = self.path(digest);
        let mut file = File::open(&path).ok()?;
        let mut data = Vec::with_capacity(len);
        // One byte more than expected tells a longer file from a right one.
        let read = (&mut file).take(len as u64 + 1).read_to_end(&mut data);
        if read.is_err() || data.len() != len || Digest::of(&data) != *digest {
            log::warn!("cache: {} is corrupt; dropping it", path.display());
            let _ = std::fs::remove_file(&path);
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
        self.path(digest).exists()
    }

    /// Publishes a verified chunk: written aside, then renamed into place.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        let path = self.path(digest);
        if path.exists() {
            return Ok(());
        }
        let tmp = self.dir.join("chunks").join("tmp").join(format!(
            "{}.{}.{}",
            digest.to_hex(),
            std::process::id(),
            self.seq.fetch_add(1, Ordering::Relaxed)
        ));
        let written = (|| -> std::io::Result<()> {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io("publish to cache", path.display())(e));
        }
        let used = self.used.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
        if used > self.capacity {
            self.evict()?;
        }
        Ok(())
    }

    /// Tries to become the one process fetching `digest`.
    pub(crate) fn try_lock_fetch(&self, digest: &Digest) -> FetchLock {
        let slot = digest.prefix_u64() % LOCK_SLOTS;
        let lock = flock(libc::F_WRLCK as i16, slot);
        match fcntl(self.locks.as_fd(), FcntlArg::F_OFD_SETLK(&lock)) {
            Ok(_) => FetchLock::Ours(slot),
            // Unexpected lock errors (no OFD locks on this filesystem): fetch anyway.
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => FetchLock::Peer,
            Err(e) => {
                log::debug!("cache: fetch lock unavailable ({e}); fetching without it");
                FetchLock::Ours(u64::MAX)
            }
        }
    }

    /// Whether another process still holds the fetch lock of `digest`.
    pub(crate) fn peer_fetching(&self, digest: &Digest) -> bool {
        let slot = digest.prefix_u64() % LOCK_SLOTS;
        let mut probe = flock(libc::F_WRLCK as i16, slot);
        match fcntl(self.locks.as_fd(), FcntlArg::F_OFD_GETLK(&mut probe)) {
            Ok(_) => probe.l_type != libc::F_UNLCK as i16,
            Err(_) => false,
        }
    }

    /// Releases a fetch lock taken with [`ChunkCache::try_lock_fetch`].
    pub(crate) fn unlock_fetch(&self, slot: u64) {
        if slot == u64::MAX {
            return;
        }
        let lock = flock(libc::F_UNLCK as i16, slot);
        let _ = fcntl(self.locks.as_fd(), FcntlArg::F_OFD_SETLK(&lock));
    }

    /// Every cached chunk with its size and modification time.
    fn entries(&self) -> Result<Vec<(PathBuf, u64, SystemTime)>> {
        let root = self.dir.join("chunks");
        let mut out = Vec::new();
        let dirs = std::fs::read_dir(&root).map_err(Error::io("list cache", root.display()))?;
        for dir in dirs.flatten() {
            if dir.file_name() == "tmp" || !dir.path().is_dir() {
                continue;
            }
            let Ok(files) = std::fs::read_dir(dir.path()) else {
                continue;
            };
            for f in files.flatten() {
                if let Ok(meta) = f.metadata() {
                    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    out.push((f.path(), meta.len(), mtime));
                }
            }
        }
        Ok(out)
    }

    /// Deletes the least recently used chunks until the cache holds at most 90 % of its
    /// bound. Another process already evicting makes this a no-op.
    pub fn evict(&self) -> Result<()> {
        let lock_path = self.dir.join("evict.lock");
        let file = File::create(&lock_path).map_err(Error::io("open", lock_path.display()))?;
        let Ok(_guard) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            return Ok(());
        };
        let mut entries = self.entries()?;
        let mut used: u64 = entries.iter().map(|e| e.1).sum();
        let target = self.capacity / 10 * 9;
        entries.sort_by_key(|e| e.2);
        for (path, size, _) in entries {
            if used <= target {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                used -= size;
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.used.store(used, Ordering::Relaxed);
        Ok(())
    }
}

fn flock(kind: i16, slot: u64) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as i16,
        l_start: slot as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chunked-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn put_then_get_returns_the_chunk_and_counts_a_hit() {
        let dir = temp_dir("hit");
        let cache = ChunkCache::open(&dir, 1 << 20).unwrap();
        let data = vec![7u8; 4096];
        let d = Digest::of(&data);
        assert_eq!(cache.get(&d, 4096), None);
        cache.put(&d, &data).unwrap();
        assert_eq!(cache.get(&d, 4096), Some(data));
        assert_eq!(cache.stats().hits, 1);
        assert_eq!(cache.stats().misses, 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_corrupted_cache_file_is_dropped_not_served() {
        let dir = temp_dir("corrupt");
        let cache = ChunkCache::open(&dir, 1 << 20).unwrap();
        let data = vec![1u8; 4096];
        let d = Digest::of(&data);
        cache.put(&d, &data).unwrap();
        std::fs::write(cache.path(&d), vec![2u8; 4096]).unwrap();
        assert_eq!(cache.get(&d, 4096), None);
        assert!(!cache.contains(&d));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_least_recently_used_chunks_go_first_when_over_the_bound() {
        let dir = temp_dir("lru");
        let cache = ChunkCache::open(&dir, 10 * 4096).unwrap();
        let chunks: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 4096]).collect();
        for (i, c) in chunks.iter().enumerate() {
            cache.put(&Digest::of(c), c).unwrap();
            // Distinct modification times, oldest first.
            let t = nix::sys::time::TimeSpec::new(1_000_000 + i as i64, 0);
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                &cache.path(&Digest::of(c)),
                &t,
                &t,
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            )
            .unwrap();
        }
        // Chunk 0 is used again: it becomes the newest.
        assert!(cache.get(&Digest::of(&chunks[0]), 4096).is_some());
        let extra = vec![99u8; 4096];
        cache.put(&Digest::of(&extra), &extra).unwrap();
        assert!(cache.stats().used <= 9 * 4096);
        assert!(
            cache.contains(&Digest::of(&chunks[0])),
            "recently used survives"
        );
        assert!(
            !cache.contains(&Digest::of(&chunks[1])),
            "least recently used goes"
        );
        assert!(cache.contains(&Digest::of(&extra)));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_second_open_description_sees_the_fetch_lock_taken() {
        let dir = temp_dir("lock");
        let a = ChunkCache::open(&dir, 1 << 20).unwrap();
        let b = ChunkCache::open(&dir, 1 << 20).unwrap();
        let d = Digest::of(b"x");
        let FetchLock::Ours(slot) = a.try_lock_fetch(&d) else {
            panic!("first locker must win");
        };
        assert_eq!(b.try_lock_fetch(&d), FetchLock::Peer);
        assert!(b.peer_fetching(&d));
        a.unlock_fetch(slot);
        assert!(!b.peer_fetching(&d));
        assert!(matches!(b.try_lock_fetch(&d), FetchLock::Ours(_)));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
