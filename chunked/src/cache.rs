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

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{fcntl, FcntlArg};
use uffd_core::private_fs::{self, FsError, PrivateDir};

use crate::error::{Error, Result};
use crate::hash::Digest;

/// Slots in the fetch-lock file: digests share a slot rarely, and sharing one only
/// serialises two fetches.
const LOCK_SLOTS: u64 = 1 << 20;

/// How old a temporary chunk file of a dead process must be before it is reclaimed.
const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(60);
/// How old any temporary chunk file must be before it is reclaimed.
const ABANDONED_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

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

/// Whether a fetch lock was taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FetchLock {
    /// This process fetches the chunk; [`ChunkCache::unlock`] when published.
    Ours(u64),
    /// Another process is fetching it: wait for it to appear.
    Peer,
}

/// A cached chunk found by a scan: which fan-out directory, its name, its size on disk,
/// its last use.
struct Entry {
    dir: usize,
    name: OsString,
    bytes: u64,
    used: (i64, i64),
}

fn private(what: &'static str) -> impl FnOnce(FsError) -> Error {
    move |source| Error::Private { what, source }
}

/// Bytes a chunk of `len` bytes takes on disk, as [`private_fs::allocated_bytes`] will
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

    /// Removes the temporary files of writers that died between writing a chunk and
    /// renaming it into place (killed, say): named `<digest>.<pid>.<random>`, a file whose
    /// process is gone and which is older than [`ORPHAN_AGE`] (a margin for a process of
    /// another PID namespace, whose PID means nothing here), or any older than
    /// [`ABANDONED_AGE`] (a chunk is written in far less). Best effort: what cannot be
    /// removed stays for the next open.
    fn reclaim_orphans(&self) {
        let Ok(entries) = self.tmp.entries() else {
            return;
        };
        let now = std::time::SystemTime::now();
        for (name, st) in entries {
            if !private_fs::is_regular(&st) {
                continue;
            }
            let modified = std::time::UNIX_EPOCH
                + std::time::Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32);
            let age = now.duration_since(modified).unwrap_or_default();
            let pid = name
                .to_str()
                .and_then(|n| n.split('.').nth(1))
                .and_then(|p| p.parse::<i32>().ok())
                .filter(|&p| p > 0);
            let dead = pid.is_some_and(|p| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None)
                    == Err(nix::errno::Errno::ESRCH)
            });
            if (dead && age >= ORPHAN_AGE) || age >= ABANDONED_AGE {
                match self.tmp.remove(&name) {
                    Ok(()) => log::debug!("cache: removed {name:?}, left by a dead writer"),
                    Err(e) => log::warn!("cache: could not remove a dead writer's file: {e}"),
                }
            }
        }
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

    /// Every cached chunk with its size on disk (blocks actually used, so a sparse file
    /// counts what it takes) and last use, and the fan-out directories they are in. Only
    /// regular files in our own fan-out directories count; a link or anything else
    /// planted there is neither followed nor counted.
    fn entries(&self) -> Result<(Vec<PrivateDir>, Vec<Entry>)> {
        let mut dirs = Vec::new();
        let mut out = Vec::new();
        let listed = self.chunks.entries().map_err(private("list the cache"))?;
        for (name, st) in listed {
            let fan_out = name.len() == 2 && name.as_encoded_bytes().iter().all(u8::is_ascii_hexdigit);
            if !fan_out || !private_fs::is_dir(&st) {
                continue;
            }
            let dir = match self.chunks.existing_subdir(&name) {
                Ok(Some(dir)) => dir,
                Ok(None) => continue,
                Err(e) => {
                    log::warn!("cache: {e}; skipping it");
                    continue;
                }
            };
            let files = dir.entries().map_err(private("list the cache"))?;
            for (name, st) in files {
                if private_fs::is_regular(&st) {
                    out.push(Entry {
                        dir: dirs.len(),
                        name,
                        bytes: private_fs::allocated_bytes(&st),
                        used: (st.st_mtime, st.st_mtime_nsec),
                    });
                }
            }
            dirs.push(dir);
        }
        Ok((dirs, out))
    }

    /// Deletes the least recently used chunks until the cache holds at most 90 % of its
    /// bound. Another process already evicting makes this a no-op.
    pub fn evict(&self) -> Result<()> {
        self.evict_down_to(self.capacity / 10 * 9)
    }

    /// Empties the cache (a cold start): every chunk goes.
    pub fn clear(&self) -> Result<()> {
        self.evict_down_to(0)
    }

    fn evict_down_to(&self, target: u64) -> Result<()> {
        let file = self
            .dir
            .open_or_create_file("evict.lock")
            .map_err(private("open the cache's eviction lock"))?;
        let Ok(_guard) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            return Ok(());
        };
        let (dirs, mut entries) = self.entries()?;
        let mut used: u64 = entries.iter().map(|e| e.bytes).sum();
        entries.sort_by_key(|e| e.used);
        for e in entries {
            if used <= target {
                break;
            }
            // unlinkat relative to the checked fan-out directory: never a path that could
            // have been redirected, never outside the cache.
            if dirs[e.dir].remove(&e.name).is_ok() {
                used -= e.bytes;
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
    fn open_reclaims_the_temporary_files_of_dead_writers_only() {
        let dir = temp_dir("orphans");
        drop(ChunkCache::open(&dir, 1 << 20).unwrap());
        let tmp = dir.join("chunks/tmp");
        let hex = Digest::of(b"orphan").to_hex();
        // A PID that was a process's and is no more.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let ago = |secs| std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
        let plant = |name: String, modified| {
            let f = std::fs::File::create(tmp.join(&name)).unwrap();
            f.set_len(4096).unwrap();
            f.set_modified(modified).unwrap();
            name
        };
        let orphan = plant(format!("{hex}.{dead}.a"), ago(120));
        let fresh = plant(format!("{hex}.{dead}.b"), ago(0));
        let alive = plant(format!("{hex}.{}.c", std::process::id()), ago(120));
        let abandoned = plant(format!("{hex}.{}.d", std::process::id()), ago(7200));
        drop(ChunkCache::open(&dir, 1 << 20).unwrap());
        let left: Vec<String> = std::fs::read_dir(&tmp)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!left.contains(&orphan), "a dead writer's file stays: {left:?}");
        assert!(!left.contains(&abandoned), "an abandoned file stays: {left:?}");
        assert!(left.contains(&fresh), "a fresh file went: {left:?}");
        assert!(left.contains(&alive), "a live writer's file went: {left:?}");
        std::fs::remove_dir_all(dir).unwrap();
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

    #[test]
    fn a_fifo_at_a_chunks_name_is_dropped_not_waited_on() {
        let dir = temp_dir("fifo");
        let cache = ChunkCache::open(&dir, 1 << 20).unwrap();
        let data = vec![3u8; 4096];
        let d = Digest::of(&data);
        cache.put(&d, &data).unwrap();
        std::fs::remove_file(cache.path(&d)).unwrap();
        nix::unistd::mkfifo(&cache.path(&d), nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Before: File::open of the FIFO blocked until a writer came — forever.
        assert_eq!(cache.get(&d, 4096), None);
        assert!(std::fs::symlink_metadata(cache.path(&d)).is_err(), "the FIFO is gone");
        cache.put(&d, &data).unwrap();
        assert_eq!(cache.get(&d, 4096), Some(data));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_sparse_file_counts_the_blocks_it_takes_not_its_length() {
        let dir = temp_dir("sparse");
        let cache = ChunkCache::open(&dir, 1 << 20).unwrap();
        let data = vec![4u8; 4096];
        cache.put(&Digest::of(&data), &data).unwrap();
        let filler = dir.join("chunks/ab/filler");
        std::fs::create_dir_all(filler.parent().unwrap()).unwrap();
        std::fs::File::create(&filler)
            .and_then(|f| f.set_len(9 << 30))
            .unwrap();
        drop(cache);
        let cache = ChunkCache::open(&dir, 1 << 20).unwrap();
        assert!(cache.stats().used < 1 << 20, "{:?}", cache.stats());
        cache.evict().unwrap();
        assert!(cache.contains(&Digest::of(&data)), "nothing evicted for a hole");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn eviction_never_follows_a_linked_fan_out_directory() {
        let dir = temp_dir("linked");
        let outside = temp_dir("linked-outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("precious"), vec![1u8; 64 << 10]).unwrap();
        let cache = ChunkCache::open(&dir, 8 * 4096).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("chunks/aa")).unwrap();
        for i in 0..16u8 {
            let data = vec![i; 4096];
            cache.put(&Digest::of(&data), &data).unwrap();
        }
        assert!(cache.stats().evicted > 0);
        assert!(outside.join("precious").exists(), "eviction left the cache");
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(outside).unwrap();
    }

    #[test]
    fn a_cache_directory_another_user_owns_is_refused() {
        if !testkit::attacker::available("a_cache_directory_another_user_owns_is_refused") {
            return;
        }
        // /tmp is sticky and world-writable: anyone may create a name there first.
        let dir = temp_dir("strangers");
        testkit::attacker::as_nobody(|| {
            std::fs::create_dir(&dir).map_err(|e| testkit::attacker::failed("mkdir", &dir, e))
        });
        match ChunkCache::open(&dir, 1 << 20) {
            Err(Error::Private {
                source: FsError::NotOwned { owner, .. },
                ..
            }) => assert_eq!(owner, testkit::attacker::NOBODY),
            other => panic!("opened a stranger's cache: {other:?}"),
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
