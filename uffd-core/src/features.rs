//! The feature and ioctl bit sets `UFFDIO_API` and `UFFDIO_REGISTER` speak in: plain
//! `bitflags` types over the kernel's bits, below the calls (and the errors) that use them.
//!
//! See `ioctl_userfaultfd(2)` and `Documentation/admin-guide/mm/userfaultfd.rst`.

use bitflags::bitflags;

use crate::sys;

bitflags! {
    /// `UFFD_FEATURE_*`: what the handshake can ask for. Names are the kernel's constants
    /// without the `UFFD_FEATURE_` prefix. Unknown bits (newer kernels) are kept.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Features: u64 {
        /// Write-protect faults are reported with `UFFD_PAGEFAULT_FLAG_WP` (since 4.3 as a flag, usable since 5.7).
        const PAGEFAULT_FLAG_WP = 1 << 0;
        /// `UFFD_EVENT_FORK`: a child's copy of the context is delivered (since 4.11).
        const EVENT_FORK = 1 << 1;
        /// `UFFD_EVENT_REMAP`: mremap of a registered range (since 4.11).
        const EVENT_REMAP = 1 << 2;
        /// `UFFD_EVENT_REMOVE`: MADV_DONTNEED / MADV_REMOVE of a registered range (since 4.11).
        const EVENT_REMOVE = 1 << 3;
        /// MISSING mode on hugetlbfs (since 4.11).
        const MISSING_HUGETLBFS = 1 << 4;
        /// MISSING mode on shmem (since 4.11).
        const MISSING_SHMEM = 1 << 5;
        /// `UFFD_EVENT_UNMAP`: munmap of a registered range (since 4.11).
        const EVENT_UNMAP = 1 << 6;
        /// Faults raise SIGBUS in the faulting thread instead of queueing an event (since 4.14).
        const SIGBUS = 1 << 7;
        /// Page-fault events carry the faulting thread's id (since 4.14).
        const THREAD_ID = 1 << 8;
        /// MINOR mode on hugetlbfs (since 5.13).
        const MINOR_HUGETLBFS = 1 << 9;
        /// MINOR mode on shmem (since 5.14).
        const MINOR_SHMEM = 1 << 10;
        /// Report the exact faulting address, not page-aligned (since 5.18).
        const EXACT_ADDRESS = 1 << 11;
        /// WP mode on hugetlbfs and shmem (since 5.19).
        const WP_HUGETLBFS_SHMEM = 1 << 12;
        /// WP on unpopulated ptes of anonymous memory (since 6.4).
        const WP_UNPOPULATED = 1 << 13;
        /// `UFFDIO_POISON` (since 6.6).
        const POISON = 1 << 14;
        /// Write-protect faults resolved by the kernel, tracked via PAGEMAP_SCAN (since 6.7).
        const WP_ASYNC = 1 << 15;
        /// `UFFDIO_MOVE` (since 6.8).
        const MOVE = 1 << 16;

        // Keep bits a newer kernel reports even though this crate has no name for them.
        const _ = !0;
    }
}

bitflags! {
    /// The ioctl bit set: bit `n` is the ioctl with number `_UFFDIO_*` = `n`. Returned by
    /// `UFFDIO_API` (the fd's ioctls) and `UFFDIO_REGISTER` (the range's ioctls).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Ioctls: u64 {
        /// `UFFDIO_REGISTER`.
        const REGISTER = 1 << sys::_UFFDIO_REGISTER;
        /// `UFFDIO_UNREGISTER`.
        const UNREGISTER = 1 << sys::_UFFDIO_UNREGISTER;
        /// `UFFDIO_WAKE`.
        const WAKE = 1 << sys::_UFFDIO_WAKE;
        /// `UFFDIO_COPY`.
        const COPY = 1 << sys::_UFFDIO_COPY;
        /// `UFFDIO_ZEROPAGE`.
        const ZEROPAGE = 1 << sys::_UFFDIO_ZEROPAGE;
        /// `UFFDIO_MOVE`.
        const MOVE = 1 << sys::_UFFDIO_MOVE;
        /// `UFFDIO_WRITEPROTECT`.
        const WRITEPROTECT = 1 << sys::_UFFDIO_WRITEPROTECT;
        /// `UFFDIO_CONTINUE`.
        const CONTINUE = 1 << sys::_UFFDIO_CONTINUE;
        /// `UFFDIO_POISON`.
        const POISON = 1 << sys::_UFFDIO_POISON;
        /// `UFFDIO_API`.
        const API = 1 << sys::_UFFDIO_API;

        const _ = !0;
    }
}

/// Bits the kernel uses inside the context and shows in fdinfo, never part of the ABI
/// (`UFFD_FEATURE_INITIALIZED`, bit 31 since 6.1).
pub(crate) const INTERNAL_FEATURE_BITS: u64 = 1 << 31;

impl Features {
    /// The kernel's constant names (without prefix) of the set bits, unknown bits as hex.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.iter_names().map(|(n, _)| n.to_string()).collect();
        let unknown = self.bits() & !Features::all_named().bits();
        if unknown != 0 {
            names.push(format!("{unknown:#x}"));
        }
        names
    }

    /// Every feature this crate has a name for.
    pub fn all_named() -> Features {
        Features::all()
            .iter_names()
            .fold(Features::empty(), |acc, (_, f)| acc | f)
    }
}

impl Ioctls {
    /// The ioctl names (without the `UFFDIO_` prefix) of the set bits.
    pub fn names(&self) -> Vec<String> {
        self.iter_names().map(|(n, _)| n.to_string()).collect()
    }
}
