//! The range ioctls: wake, and the ones that resolve faults by placing or protecting pages.
//!
//! The placement ioctls (copy, zeropage, continue, poison, move) write their progress back
//! into the argument. Success means the whole range was done; a partial result comes back
//! as [`Error::Again`] with the bytes done, whichever way the kernel encoded it.
//!
//! Which of them are `unsafe`: those that make *content* appear in memory (copy, continue,
//! move — move also takes pages away from its source), and zeropage: zeros are what an
//! untouched anonymous page holds, but in a private mapping of a file (a binary or a
//! library on tmpfs, a memfd mapped `MAP_PRIVATE`: registrable in MISSING mode) a missing
//! page must read as the file, and the kernel maps the zero page there all the same.
//! Poison markers give no value at all, only a fault, so poison is safe.

use std::os::fd::AsRawFd;

use bitflags::bitflags;
use nix::errno::Errno;

use crate::error::{Error, Op, Result};
use crate::features::Features;
use crate::open::Uffd;
use crate::register::check_range;
use crate::sys;

bitflags! {
    /// `UFFDIO_COPY_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CopyMode: u64 {
        /// Do not wake the faulting threads; follow with [`Uffd::wake`] (since Linux 4.3).
        const DONTWAKE = sys::UFFDIO_COPY_MODE_DONTWAKE;
        /// Map the page write-protected (needs a WP registration; since Linux 5.7).
        const WP = sys::UFFDIO_COPY_MODE_WP;
    }
}

bitflags! {
    /// `UFFDIO_ZEROPAGE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ZeropageMode: u64 {
        /// Do not wake the faulting threads (since Linux 4.3).
        const DONTWAKE = sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE;
    }
}

bitflags! {
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct WriteProtectMode: u64 {
        /// Set write protection; without it the range is un-protected (since Linux 5.7).
        const WP = sys::UFFDIO_WRITEPROTECT_MODE_WP;
        /// When un-protecting, do not wake the waiting threads (since Linux 5.7).
        const DONTWAKE = sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
    }
}

bitflags! {
    /// `UFFDIO_CONTINUE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ContinueMode: u64 {
        /// Do not wake the faulting threads (since Linux 5.13).
        const DONTWAKE = sys::UFFDIO_CONTINUE_MODE_DONTWAKE;
        /// Map the page write-protected (since Linux 6.6).
        const WP = sys::UFFDIO_CONTINUE_MODE_WP;
    }
}

bitflags! {
    /// `UFFDIO_POISON_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct PoisonMode: u64 {
        /// Do not wake the faulting threads (since Linux 6.6).
        const DONTWAKE = sys::UFFDIO_POISON_MODE_DONTWAKE;
    }
}

bitflags! {
    /// `UFFDIO_MOVE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MoveMode: u64 {
        /// Do not wake the faulting threads (since Linux 6.8).
        const DONTWAKE = sys::UFFDIO_MOVE_MODE_DONTWAKE;
        /// Skip holes in the source instead of failing with ENOENT (since Linux 6.8).
        const ALLOW_SRC_HOLES = sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES;
    }
}

impl Uffd {
    /// Issues `request` with `arg`; on failure classifies the errno using the result field.
    pub(crate) fn range_ioctl<T>(
        &self,
        op: Op,
        request: u32,
        arg: &mut T,
        written_back: impl Fn(&T) -> i64,
        len: usize,
    ) -> Result<usize> {
        // SAFETY: every caller pairs `request` with the one argument struct it reads and
        // writes; the kernel touches nothing beyond `*arg` in this address space.
        let ret = unsafe { libc::ioctl(self.as_raw_fd(), request as _, arg as *mut T) };
        if ret < 0 {
            return Err(Error::from_errno(op, Errno::last(), written_back(arg)));
        }
        Ok(len)
    }

    /// Wakes threads waiting on faults in `[start, start + len)`; used after `DONTWAKE`
    /// placements, or when a page turned out to be present already (`Exists`).
    ///
    /// See `ioctl_userfaultfd(2)`, `UFFDIO_WAKE`. Since Linux 4.3.
    pub fn wake(&self, start: usize, len: usize) -> Result<()> {
        check_range(Op::Wake, start, len)?;
        let mut arg = sys::uffdio_range {
            start: start as u64,
            len: len as u64,
        };
        self.range_ioctl(Op::Wake, sys::UFFDIO_WAKE, &mut arg, |_| 0, len)
            .map(drop)
    }

    /// Atomically copies `src` into the missing pages at `dst` (`src.len()` bytes) and,
    /// unless `DONTWAKE`, wakes the threads faulting there. Returns the bytes placed.
    ///
    /// See `ioctl_userfaultfd(2)`, `UFFDIO_COPY`. Since Linux 4.3 (`WP` since 5.7).
    ///
    /// # Safety
    /// `dst..dst + src.len()` lies in a range registered with this fd, in the address
    /// space this fd serves (possibly another process's). The caller is entitled to decide
    /// what that memory contains: no code there relies on it reading as zero or as any
    /// other value than `src` (e.g. an allocator's assumption that fresh pages are zero).
    pub unsafe fn copy(&self, dst: usize, src: &[u8], mode: CopyMode) -> Result<usize> {
        check_range(Op::Copy, dst, src.len())?;
        let mut arg = sys::uffdio_copy {
            dst: dst as u64,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: mode.bits(),
            copy: 0,
        };
        self.range_ioctl(Op::Copy, sys::UFFDIO_COPY, &mut arg, |a| a.copy, src.len())
    }

    /// Maps the shared zero page (or zeroed pages) at the missing pages of
    /// `[start, start + len)`. Not available on hugetlb ranges.
    ///
    /// See `ioctl_userfaultfd(2)`, `UFFDIO_ZEROPAGE`. Since Linux 4.3.
    ///
    /// # Safety
    /// `[start, start + len)` lies in a range registered with this fd, in the address space
    /// this fd serves, and the caller is entitled to decide that its missing pages read as
    /// zeros: no code there relies on them reading as anything else — in particular the
    /// range is not a private mapping of a file (the kernel maps the zero page over the
    /// file's data there: a `static` of a binary on tmpfs would change).
    pub unsafe fn zeropage(&self, start: usize, len: usize, mode: ZeropageMode) -> Result<usize> {
        check_range(Op::Zeropage, start, len)?;
        let mut arg = sys::uffdio_zeropage {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            zeropage: 0,
        };
        self.range_ioctl(
            Op::Zeropage,
            sys::UFFDIO_ZEROPAGE,
            &mut arg,
            |a| a.zeropage,
            len,
        )
    }

    /// Write-protects (`WP`) or un-protects `[start, start + len)` in a WP-registered range.
    /// Un-protecting wakes the threads blocked on write-protect faults unless `DONTWAKE`.
    ///
    /// See `ioctl_userfaultfd(2)`, `UFFDIO_WRITEPROTECT`. Since Linux 5.7 (anon), 5.19
    /// (shmem, hugetlbfs).
    pub fn write_protect(&self, start: usize, len: usize, mode: WriteProtectMode) -> Result<()> {
        check_range(Op::Writeprotect, start, len)?;
        let mut arg = sys::uffdio_writeprotect {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: mode.bits(),
        };
        self.range_ioctl(
            Op::Writeprotect,
            sys::UFFDIO_WRITEPROTECT,
            &mut arg,
            |_| 0,
            len,
        )
        .map(drop)
    }

    /// Resolves minor faults: maps the page-cache pages already present behind
    /// `[start, start + len)` (shmem / hugetlbfs registered in MINOR mode).
    ///
    /// See `ioctl_userfaultfd(2)`, `UFFDIO_CONTINUE`. Since Linux 5.13 (`WP` since 6.6).
    ///
    /// # Safety
    /// As for [`Uffd::copy`]: the range is registered with this fd, and the caller is
    /// entitled to make the page cache's current content visible there.
    pub unsafe fn continue_range(
        &self,
        start: usize,
        len: usize,
        mode: ContinueMode,
    ) -> Result<usize> {
        check_range(Op::Continue, start, len)?;
        let mut arg = sys::uffdio_continue {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            mapped: 0,
        };
        self.range_ioctl(
            Op::Continue,
            sys::UFFDIO_CONTINUE,
            &mut arg,
            |a| a.mapped,
            len,
        )
    }

    /// Marks the missing pages of `[start, start + len)` as poisoned: touching them raises
    /// SIGBUS (as a hardware memory error would), neighbours are unaffected, and the
    /// marker outlives the userfaultfd (closing it does not turn the pages into zeros).
    /// The `POISON` feature bit only advertises the ioctl: the kernel does not require it
    /// to have been negotiated, so a uffd adopted from a VMM that asked for less (as
    /// Firecracker's does) can still be poisoned; a kernel without it answers `EINVAL`.
    ///
    /// See `ioctl_userfaultfd(2)`, `UFFDIO_POISON`. Since Linux 6.6.
    pub fn poison(&self, start: usize, len: usize, mode: PoisonMode) -> Result<usize> {
        check_range(Op::Poison, start, len)?;
        let mut arg = sys::uffdio_poison {
            range: sys::uffdio_range {
                start: start as u64,
                len: len as u64,
            },
            mode: mode.bits(),
            updated: 0,
        };
        self.range_ioctl(Op::Poison, sys::UFFDIO_POISON, &mut arg, |a| a.updated, len)
    }

    /// Moves the pages at `src` to the missing pages at `dst` without copying (both in
    /// the address space this fd serves; anonymous private memory only), leaving `src`
    /// unmapped. Needs the `MOVE` feature.
    ///
    /// See `ioctl_userfaultfd(2)`, `UFFDIO_MOVE`. Since Linux 6.8.
    ///
    /// # Safety
    /// As for [`Uffd::copy`] at `dst`; and `src..src + len` is memory whose content the
    /// caller owns and gives up: afterwards it reads as missing (zero, or a new fault).
    pub unsafe fn move_pages(
        &self,
        dst: usize,
        src: usize,
        len: usize,
        mode: MoveMode,
    ) -> Result<usize> {
        check_range(Op::Move, dst, len)?;
        check_range(Op::Move, src, len)?;
        self.need(Op::Move, Features::MOVE)?;
        let mut arg = sys::uffdio_move {
            dst: dst as u64,
            src: src as u64,
            len: len as u64,
            mode: mode.bits(),
            moved: 0,
        };
        self.range_ioctl(Op::Move, sys::UFFDIO_MOVE, &mut arg, |a| a.moved, len)
    }
}
