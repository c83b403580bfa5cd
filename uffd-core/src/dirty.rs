//! Dirty-page tracking: userfaultfd async write-protect plus `PAGEMAP_SCAN` (Linux 6.7).
//!
//! Register a range for write-protect with `UFFD_FEATURE_WP_ASYNC` and protect all of it:
//! from then on a write to a protected page is resolved by the kernel itself (the
//! protection is dropped, the page becomes *written*), with no event and no handler, so
//! the writer never waits on us. [`DirtyTracker::collect`] then asks `PAGEMAP_SCAN` for
//! the written pages and, with `PM_SCAN_WP_MATCHING`, protects them again in the same
//! page-table walk under the page-table lock: a write is seen by this collection or by the
//! next one, never by neither (`writes_racing_the_scan_are_never_lost` in this crate's
//! tests checks that). One ioctl per round returns runs rather than 8 bytes per page.
//!
//! Why this and not soft-dirty bits: reading `/proc/PID/pagemap` soft-dirty bits and
//! clearing them (`echo 4 > clear_refs`) are two steps over the *whole process*, so a
//! write landing between the read and the clear is lost unless the round is repeated,
//! and clearing disturbs every other mapping of the process. The cost of this way: Linux
//! 6.7+, and memory registered with a userfaultfd that has `WP_ASYNC` — which then can
//! report no synchronous write-protect fault at all (the feature is per fd, and a range
//! belongs to one fd), so a tracker cannot share its range with a handler that must
//! block writes.
//!
//! Users: the postcopy migration source (precopy rounds) and incremental snapshots.

use std::ops::Range;

use crate::error::{Error, Op, Result};
use crate::features::Features;
use crate::ioctl::WriteProtectMode;
use crate::open::Uffd;
use crate::pagemap::{PageRegion, Pagemap, ScanQuery};
use crate::register::RegisterMode;

/// Tracks writes to `[base, base + len)` of the address space a userfaultfd serves.
#[derive(Debug)]
pub struct DirtyTracker {
    uffd: Uffd,
    pagemap: Pagemap,
    base: usize,
    len: usize,
    out: Vec<PageRegion>,
}

impl DirtyTracker {
    /// Tracks `[base, base + len)` of this process with a userfaultfd of its own (anonymous
    /// memory; shmem and hugetlb too where the kernel offers `WP_HUGETLBFS_SHMEM`).
    /// Everything is protected on return: from now on every write, including to pages
    /// not yet populated, is reported by [`collect`](DirtyTracker::collect).
    pub fn start(base: usize, len: usize) -> Result<DirtyTracker> {
        let uffd = Uffd::builder()
            .require(Features::WP_ASYNC | Features::WP_UNPOPULATED)
            .optional(Features::WP_HUGETLBFS_SHMEM)
            .open()?;
        DirtyTracker::with_uffd(uffd, Pagemap::open()?, base, len)
    }

    /// Tracks `[base, base + len)` of the address space `uffd` serves (another process's,
    /// if the fd came from there; then `pagemap` is that process's, see
    /// [`Pagemap::open_pid`]). The fd must have been negotiated with `WP_ASYNC` (and
    /// `WP_UNPOPULATED` for anonymous memory), and the range must not be registered with
    /// another userfaultfd. Registers the range in WP mode and protects all of it.
    pub fn with_uffd(uffd: Uffd, pagemap: Pagemap, base: usize, len: usize) -> Result<Self> {
        if !uffd.features().contains(Features::WP_ASYNC) {
            return Err(Error::Unsupported {
                op: Op::PagemapScan,
                missing: Features::WP_ASYNC,
            });
        }
        uffd.register(base, len, RegisterMode::WP)?;
        let tracker = DirtyTracker {
            uffd,
            pagemap,
            base,
            len,
            out: vec![PageRegion::default(); 1024],
        };
        // On failure `tracker` drops here and unregisters the range again.
        tracker
            .uffd
            .write_protect(base, len, WriteProtectMode::WP)?;
        Ok(tracker)
    }

    /// The tracked range: start address and length.
    pub fn range(&self) -> (usize, usize) {
        (self.base, self.len)
    }

    /// Reports the runs of written pages and protects them again in one walk: `run` gets
    /// each run as byte offsets from the range's start, in increasing order. Returns the
    /// base pages written.
    pub fn collect_runs(&mut self, mut run: impl FnMut(Range<usize>)) -> Result<u64> {
        let end = self.base + self.len;
        let mut at = self.base;
        let mut written = 0;
        let page = crate::page_size() as u64;
        while at < end {
            let (n, walk_end) =
                self.pagemap
                    .scan(at, end, &ScanQuery::written_and_reprotect(), &mut self.out)?;
            for r in &self.out[..n] {
                written += (r.end - r.start) / page;
                run(r.start as usize - self.base..r.end as usize - self.base);
            }
            if walk_end <= at {
                break; // no progress: cannot happen with a non-empty output vector
            }
            at = walk_end;
        }
        Ok(written)
    }

    /// Like [`collect_runs`](DirtyTracker::collect_runs), by blocks: `mark(i)` is called for
    /// each `granule`-sized block (index from the range's start) holding a written page, in
    /// increasing order, possibly more than once per block. Returns the base pages written.
    pub fn collect(&mut self, granule: usize, mut mark: impl FnMut(u64)) -> Result<u64> {
        self.collect_runs(|r| {
            for g in r.start / granule..=(r.end - 1) / granule {
                mark(g as u64);
            }
        })
    }
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        // Unregistering drops the protection: the memory is plain memory again.
        let _ = self.uffd.unregister(self.base, self.len);
    }
}
