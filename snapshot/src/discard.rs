//! Discards during a live snapshot: `madvise(2)` with `MADV_DONTNEED`, `MADV_FREE` or
//! `MADV_REMOVE` on memory the snapshot has write-protected.
//!
//! Why the snapshot must hear of them: a discard changes a page without a write. On
//! anonymous memory the zap also drops the page's write-protect marker (the kernel's
//! `pte_install_uffd_wp_if_needed` returns early for anonymous VMAs, and
//! `zap_install_uffd_wp_if_needed` "zap on anonymous always means dropping everything"),
//! so the next write does not fault either: a page discarded before it was saved would be
//! saved with content it never had at the cut, silently. Shmem keeps its markers through
//! a zap, but `MADV_REMOVE` punches a hole in the file: its content at the cut is gone all
//! the same.
//!
//! What the kernel gives us: with `UFFD_FEATURE_EVENT_REMOVE`, `madvise_dontneed_free()`
//! and `madvise_remove()` (mm/madvise.c) call `userfaultfd_remove()` *before* zapping or
//! punching, which queues a REMOVE event and waits until it is read from the userfaultfd
//! (`userfaultfd_ctx_read()` completes a non-fork event as it hands it out, fs/userfaultfd.c);
//! the zap runs after that. So a page copied out completely before the event was read
//! holds its content at the cut; a page copied later, or during, may hold anything. The
//! event does not say which advice it was (DONTNEED on shmem would be harmless), so every
//! kind of memory is treated alike: a REMOVE covering a page not yet captured fails the
//! snapshot with [`Error::Discarded`](crate::Error::Discarded).
//!
//! The protocol between reads and copies ("captured before the read" is what must be
//! known, and a handler learns a REMOVE's range only after reading it):
//! - every read of the userfaultfd is bracketed: `begun += 1` before the `read(2)`; after
//!   it, each REMOVE's pages are marked in `removed` (and checked: unclaimed, or claimed
//!   but not captured, is lost); then `ended += 1`.
//! - a copy loads `ended` before it starts and `begun` after it ends. Equal: no read was
//!   in progress during the copy, so every REMOVE either was read (and marked) before it
//!   started, or is read after it ended — after the zap can have touched it. Different: it
//!   waits until those reads have ended and holds the cut unless one of them marked one of
//!   its pages.
//! - a page is marked captured only after that check, so a handler that finds a page
//!   captured knows its copy ended before the read that handler made began.

use std::ops::Range;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use page_state::Bitmap;

use crate::region::Regions;

/// What reads and copies share (see the module docs).
pub(crate) struct Discards {
    /// Reads of the userfaultfd begun.
    begun: AtomicU64,
    /// Reads whose REMOVE events are all marked.
    ended: AtomicU64,
    /// Pages a REMOVE event covered.
    removed: Bitmap,
}

/// A copy's view of the reads, taken before it starts.
pub(crate) struct CopyTicket(u64);

/// Whether a copy holds its pages as they were at the cut.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CopyCheck {
    /// No discard can have reached the copy.
    HoldsTheCut,
    /// A discard covered one of its pages, or (stopping) it could not be ruled out.
    MayBeDiscarded,
}

impl Discards {
    pub fn new(pages: usize) -> Discards {
        Discards {
            begun: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            removed: Bitmap::new(pages),
        }
    }

    /// Before a `read(2)` of the userfaultfd.
    pub fn read_begins(&self) {
        // SeqCst: one total order with the copies' loads of `begun` (see the module docs).
        self.begun.fetch_add(1, Ordering::SeqCst);
    }

    /// After the REMOVE events of the read are marked.
    pub fn read_ends(&self) {
        // SeqCst (a release): a copy that sees this count also sees this read's marks.
        self.ended.fetch_add(1, Ordering::SeqCst);
    }

    /// Marks `pages` discarded.
    pub fn mark(&self, pages: Range<usize>) {
        for i in pages {
            self.removed.set(i);
        }
    }

    /// Before a copy starts.
    pub fn before_copy(&self) -> CopyTicket {
        // SeqCst (an acquire): the copy cannot start before this load.
        CopyTicket(self.ended.load(Ordering::SeqCst))
    }

    /// After the copy of `pages` ended: whether it holds the cut. Waits for reads in
    /// progress to end (they do not block); gives up when `give_up` says so.
    pub fn after_copy(
        &self,
        ticket: CopyTicket,
        pages: Range<usize>,
        give_up: impl Fn() -> bool,
    ) -> CopyCheck {
        // SeqCst fence: the copy's loads complete before `begun` is read.
        fence(Ordering::SeqCst);
        let begun = self.begun.load(Ordering::SeqCst);
        if begun == ticket.0 {
            return CopyCheck::HoldsTheCut;
        }
        let mut spins = 0u32;
        // SeqCst (an acquire): pairs with read_ends, making the reads' marks visible.
        while self.ended.load(Ordering::SeqCst) < begun {
            if give_up() {
                return CopyCheck::MayBeDiscarded;
            }
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if pages.into_iter().any(|i| self.removed.test(i)) {
            CopyCheck::MayBeDiscarded
        } else {
            CopyCheck::HoldsTheCut
        }
    }
}

/// The page indices, region by region, that `[start, end)` touches (partly touched
/// pages included).
pub(crate) fn pages_touched(
    regions: &Regions,
    start: usize,
    end: usize,
) -> impl Iterator<Item = Range<usize>> + '_ {
    regions.list().iter().filter_map(move |n| {
        let (addr, len) = (n.region.addr, n.region.len);
        let (s, e) = (start.max(addr), end.min(addr + len));
        let ps = n.region.page_size();
        (s < e).then(|| n.first + (s - addr) / ps..n.first + (e - addr).div_ceil(ps))
    })
}
