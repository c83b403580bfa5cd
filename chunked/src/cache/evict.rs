//! Keeping the cache within its bound: least recently used chunks evicted (one process
//! at a time, under an exclusive `flock`), and the temporary files of dead writers
//! reclaimed on open.

use std::ffi::OsString;
use std::sync::atomic::Ordering;

use uffd_core::private_fs::{self, PrivateDir};

use super::{private, ChunkCache};
use crate::error::Result;

/// How old a temporary chunk file of a dead process must be before it is reclaimed.
const ORPHAN_AGE: std::time::Duration = std::time::Duration::from_secs(60);
/// How old any temporary chunk file must be before it is reclaimed.
const ABANDONED_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// A cached chunk found by a scan: which fan-out directory, its name, its size on disk,
/// its last use.
pub(super) struct Entry {
    dir: usize,
    name: OsString,
    pub(super) bytes: u64,
    used: (i64, i64),
}

impl ChunkCache {
    /// Removes the temporary files of writers that died between writing a chunk and
    /// renaming it into place (killed, say): named `<digest>.<pid>.<random>`, a file whose
    /// process is gone and which is older than [`ORPHAN_AGE`] (a margin for a process of
    /// another PID namespace, whose PID means nothing here), or any older than
    /// [`ABANDONED_AGE`] (a chunk is written in far less). Best effort: what cannot be
    /// removed stays for the next open.
    pub(super) fn reclaim_orphans(&self) {
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

    /// Every cached chunk with its size on disk (blocks actually used, so a sparse file
    /// counts what it takes) and last use, and the fan-out directories they are in. Only
    /// regular files in our own fan-out directories count; a link or anything else
    /// planted there is neither followed nor counted.
    pub(super) fn entries(&self) -> Result<(Vec<PrivateDir>, Vec<Entry>)> {
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
