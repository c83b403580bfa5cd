//! `PAGEMAP_SCAN` (Linux 6.7): ask `/proc/self/pagemap` which pages of a range are in given
//! categories (written, present, huge, ...) and, in the same walk, write-protect the ones
//! that match.
//!
//! With a userfaultfd registered in write-protect mode and `UFFD_FEATURE_WP_ASYNC`, a write
//! to a protected page is resolved by the kernel itself: the protection is dropped and the
//! page becomes "written", with no event and no handler. `PAGEMAP_SCAN` with
//! [`ScanFlags::WP_MATCHING`] then returns the written pages *and* protects them again
//! under the page-table lock, so no write between the report and the re-protection is
//! lost. That pair is a dirty-page tracker: [`DirtyTracker`](crate::DirtyTracker).

use std::fs::File;
use std::os::fd::AsRawFd;

use bitflags::bitflags;
use nix::errno::Errno;

use crate::error::{Error, Op, Result};
use crate::sys;

bitflags! {
    /// Page categories of `PAGEMAP_SCAN` (`PAGE_IS_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PageCategories: u64 {
        /// Registered for async write-protect (`PAGE_IS_WPALLOWED`).
        const WP_ALLOWED = 1 << 0;
        /// Not write-protected, i.e. written since last protected (`PAGE_IS_WRITTEN`).
        const WRITTEN = 1 << 1;
        /// File backed (`PAGE_IS_FILE`).
        const FILE = 1 << 2;
        /// Present in memory (`PAGE_IS_PRESENT`).
        const PRESENT = 1 << 3;
        /// Swapped out (`PAGE_IS_SWAPPED`).
        const SWAPPED = 1 << 4;
        /// Maps the shared zero page (`PAGE_IS_PFNZERO`).
        const PFN_ZERO = 1 << 5;
        /// Part of a huge page (`PAGE_IS_HUGE`).
        const HUGE = 1 << 6;
        /// Soft-dirty (`PAGE_IS_SOFT_DIRTY`, 6.9).
        const SOFT_DIRTY = 1 << 7;
        /// A guard region (`PAGE_IS_GUARD`, 6.14).
        const GUARD = 1 << 8;
        const _ = !0;
    }
}

bitflags! {
    /// `PM_SCAN_*` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ScanFlags: u64 {
        /// Write-protect the matching pages in the same walk (`PM_SCAN_WP_MATCHING`).
        const WP_MATCHING = 1 << 0;
        /// Fail if the range holds a page not registered for async WP (`PM_SCAN_CHECK_WPASYNC`).
        const CHECK_WPASYNC = 1 << 1;
        const _ = !0;
    }
}

/// What to look for: a page matches when `(categories ^ inverted) & mask == mask` and,
/// if `any_of` is not empty, `(categories ^ inverted) & any_of != 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanQuery {
    /// Flags of the walk.
    pub flags: ScanFlags,
    /// Categories to invert before matching.
    pub inverted: PageCategories,
    /// Categories that must all be set.
    pub mask: PageCategories,
    /// Categories of which one must be set (empty: no condition).
    pub any_of: PageCategories,
    /// Categories reported in each region.
    pub report: PageCategories,
    /// Stop after this many matching pages (0: no limit).
    pub max_pages: u64,
}

impl ScanQuery {
    /// Written pages, re-protected in the same walk: the dirty-tracking query.
    pub fn written_and_reprotect() -> Self {
        ScanQuery {
            flags: ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC,
            inverted: PageCategories::empty(),
            mask: PageCategories::WRITTEN,
            any_of: PageCategories::empty(),
            report: PageCategories::WRITTEN,
            max_pages: 0,
        }
    }
}

/// One run of matching pages, `[start, end)`, with the categories asked to be reported.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRegion {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Reported categories.
    pub categories: u64,
}

// The kernel's `struct page_region`, which `PAGEMAP_SCAN` writes an array of.
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

/// `/proc/self/pagemap`, open for `PAGEMAP_SCAN`.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> Result<Pagemap> {
        Pagemap::open_path("/proc/self/pagemap")
    }

    /// Opens `/proc/PID/pagemap`: scans then walk process `pid`'s page tables (the caller
    /// needs ptrace read access to it, e.g. root or its parent with a permissive Yama).
    pub fn open_pid(pid: u32) -> Result<Pagemap> {
        Pagemap::open_path(&format!("/proc/{pid}/pagemap"))
    }

    fn open_path(path: &str) -> Result<Pagemap> {
        let file = File::open(path).map_err(|e| Error::Os {
            op: Op::PagemapScan,
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        Ok(Pagemap { file })
    }

    /// Scans `[start, end)` (page aligned) with `query`, filling `out` with matching runs.
    /// Returns how many runs were filled and where the walk ended: when it ends before
    /// `end`, `out` was full (or `max_pages` was reached) and the caller scans on from there.
    pub fn scan(
        &self,
        start: usize,
        end: usize,
        query: &ScanQuery,
        out: &mut [PageRegion],
    ) -> Result<(usize, usize)> {
        let page = crate::page_size();
        if start % page != 0 || end % page != 0 || end < start {
            return Err(Error::InvalidArgument {
                op: Op::PagemapScan,
                reason: "scan range must be page aligned and not reversed",
            });
        }
        let mut arg = sys::pm_scan_arg {
            size: core::mem::size_of::<sys::pm_scan_arg>() as u64,
            flags: query.flags.bits(),
            start: start as u64,
            end: end as u64,
            walk_end: 0,
            vec: out.as_mut_ptr() as u64,
            vec_len: out.len() as u64,
            max_pages: query.max_pages,
            category_inverted: query.inverted.bits(),
            category_mask: query.mask.bits(),
            category_anyof_mask: query.any_of.bits(),
            return_mask: query.report.bits(),
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to `out.len()` writable
        // PageRegion (same layout as struct page_region); the kernel writes only there and
        // into `arg`.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                sys::PAGEMAP_SCAN as _,
                &mut arg as *mut sys::pm_scan_arg,
            )
        };
        if ret < 0 {
            return Err(Error::from_errno(Op::PagemapScan, Errno::last(), 0));
        }
        Ok((ret as usize, arg.walk_end as usize))
    }

    /// Bytes of `[start, end)` (page aligned) that huge pages map now (`PAGE_IS_HUGE`: a
    /// PMD-mapped transparent huge page, or hugetlb), walking the whole range.
    pub fn huge_bytes(&self, start: usize, end: usize) -> Result<u64> {
        let huge = ScanQuery {
            flags: ScanFlags::empty(),
            inverted: PageCategories::empty(),
            mask: PageCategories::HUGE,
            any_of: PageCategories::empty(),
            report: PageCategories::HUGE,
            max_pages: 0,
        };
        let mut out = [PageRegion::default(); 64];
        let (mut at, mut bytes) = (start, 0);
        while at < end {
            let (n, walk_end) = self.scan(at, end, &huge, &mut out)?;
            bytes += out[..n].iter().map(|r| r.end - r.start).sum::<u64>();
            if walk_end <= at {
                break;
            }
            at = walk_end;
        }
        Ok(bytes)
    }
}
