//! Dirty-page tracking for memory in this process: userfaultfd async write-protect plus
//! `PAGEMAP_SCAN`.
//!
//! Why this and not soft-dirty bits: reading `/proc/PID/pagemap` soft-dirty bits and
//! clearing them (`echo 4 > clear_refs`) are two steps over the *whole process*, so a
//! write landing between the read and the clear is lost unless the round is repeated,
//! and clearing disturbs every other mapping of the process. `PAGEMAP_SCAN` with
//! `PM_SCAN_WP_MATCHING` reports the written pages of just our range and write-protects
//! them again in the same page-table walk, under the page-table lock: a write is seen by
//! this scan or by the next one, never by neither (uffd-core's
//! `writes_racing_the_scan_are_never_lost` checks that). With `WP_ASYNC` the kernel
//! resolves the write-protect faults itself, so the workload never waits on us; one
//! ioctl per round returns runs rather than 8 bytes per page. The cost: Linux 6.7+, and
//! anonymous (or shmem/hugetlb) memory registered with a userfaultfd of our own.

use uffd_core::{Features, PageRegion, Pagemap, RegisterMode, ScanQuery, Uffd, WriteProtectMode};

use crate::Error;

/// Tracks writes to `[base, base + len)` of this process.
#[derive(Debug)]
pub struct DirtyTracker {
    uffd: Uffd,
    pagemap: Pagemap,
    base: usize,
    len: usize,
    out: Vec<PageRegion>,
}

impl DirtyTracker {
    /// Registers the range for async write-protect and protects all of it: from now on,
    /// every write (including to pages not yet populated) is reported by [`collect`].
    ///
    /// [`collect`]: DirtyTracker::collect
    pub fn start(base: usize, len: usize) -> Result<DirtyTracker, Error> {
        let uffd = Uffd::builder()
            .require(Features::WP_ASYNC | Features::WP_UNPOPULATED)
            .open()?;
        uffd.register(base, len, RegisterMode::WP)?;
        uffd.write_protect(base, len, WriteProtectMode::WP)?;
        Ok(DirtyTracker {
            uffd,
            pagemap: Pagemap::open()?,
            base,
            len,
            out: vec![PageRegion::default(); 1024],
        })
    }

    /// Reports the written pages and protects them again in one walk: `mark(i)` is called
    /// for each `granule`-sized block (index from `base`) holding a written page, in
    /// increasing order, possibly more than once per block. Returns the 4 KiB pages written.
    pub fn collect(&mut self, granule: usize, mut mark: impl FnMut(u64)) -> Result<u64, Error> {
        let end = self.base + self.len;
        let mut at = self.base;
        let mut written = 0;
        let page = uffd_core::page_size() as u64;
        while at < end {
            let (n, walk_end) =
                self.pagemap
                    .scan(at, end, &ScanQuery::written_and_reprotect(), &mut self.out)?;
            for r in &self.out[..n] {
                written += (r.end - r.start) / page;
                let first = (r.start as usize - self.base) / granule;
                let last = (r.end as usize - 1 - self.base) / granule;
                for g in first..=last {
                    mark(g as u64);
                }
            }
            if walk_end <= at {
                break; // no progress: cannot happen with a non-empty output vector
            }
            at = walk_end;
        }
        Ok(written)
    }
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        let _ = self.uffd.unregister(self.base, self.len);
    }
}
