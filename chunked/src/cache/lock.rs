//! The per-host fetch lock: before fetching a chunk from the store a process takes a
//! byte-range lock (`F_OFD_SETLK`) on a slot of the cache's shared lock file picked by the
//! digest, so a second process waits for the chunk to appear instead of fetching it too.

use std::os::fd::AsFd;

use nix::fcntl::{fcntl, FcntlArg};

use super::ChunkCache;
use crate::hash::Digest;

/// Slots in the fetch-lock file: digests share a slot rarely, and sharing one only
/// serialises two fetches.
const LOCK_SLOTS: u64 = 1 << 20;

/// Whether a fetch lock was taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FetchLock {
    /// This process fetches the chunk; [`ChunkCache::unlock_fetch`] when published.
    Ours(u64),
    /// Another process is fetching it: wait for it to appear.
    Peer,
}

impl ChunkCache {
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
