//! The fault-resolution engine shared by every handler thread, the prefetcher and the
//! placement handle: page lookup, the page-state decision, placement, and the events
//! that change the address space.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use page_state::{PageState, PageStateMap, RequestOutcome};
use uffd_core::{
    ContinueMode, CopyMode, Error as UffdError, Event, FaultFlags, Uffd, ZeropageMode,
};

use crate::error::{Error, Result};
use crate::region::{PageRef, RegionTable, Resolve};
use crate::source::{Fetched, Source};
use crate::stats::{add, bump, Stats};

/// What to put in a page.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Content<'a> {
    Data(&'a [u8]),
    Zero,
}

/// Who placed a page (for the stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Fault,
    Prefetch,
    Arrival,
}

/// What a handler must do after a fault it could not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FollowUp {
    /// EAGAIN: retry the placement once the pending events are read.
    Retry,
    /// Another party requested the page: wake the fault once the page leaves Requested.
    Watch,
}

/// The result of one placement attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Placed now, or found already present (EEXIST, then woken).
    Done,
    /// EAGAIN: an address-space change is pending; `done` bytes were placed. Retry the
    /// rest after the events are read.
    Again { done: usize },
    /// The page's range is gone (unmapped) or the process exited: nothing to do.
    Dropped,
}

/// State shared by all the pager's threads.
pub(crate) struct Shared {
    pub uffd: Uffd,
    pub regions: RwLock<RegionTable>,
    pub states: PageStateMap,
    pub source: Arc<dyn Source>,
    pub stats: Stats,
    /// Set to stop every thread; `wakeup` makes blocked pollers notice.
    pub stop: AtomicBool,
    pub wakeup: OwnedFd,
    /// The faulting process exited (ESRCH): nothing more can be served.
    pub gone: AtomicBool,
    /// Pages a REMOVE hit while their fetch was in flight: place a zero page instead.
    removed_in_flight: Mutex<HashSet<usize>>,
    removed_count: AtomicUsize,
    /// Placements under way (ioctl issued, not yet counted and published). A racing
    /// placer that meets EEXIST marks the page Received before the winner has counted
    /// it, so completion also waits for this to reach zero.
    placing: AtomicUsize,
    /// The prefetcher's next page; each fault moves it to just after the faulting page.
    pub cursor: AtomicUsize,
    /// Fault order of first touches, when recording a working set.
    pub recorder: Option<Recorder>,
    /// Extra pages placed after each faulting page (spatial locality).
    pub fault_around: usize,
    /// Zeros for placing zero pages where ZEROPAGE is unavailable (hugetlb, minor mode).
    zeros: Box<[u8]>,
    /// The first fatal error (a failing source); the pager stops on it.
    pub fatal: Mutex<Option<Error>>,
}

impl Shared {
    pub fn new(
        uffd: Uffd,
        regions: RegionTable,
        source: Arc<dyn Source>,
        record: bool,
        fault_around: usize,
    ) -> Result<Self> {
        let max_page = regions
            .regions()
            .iter()
            .map(|r| r.spec.page_size)
            .max()
            .unwrap_or(4096);
        let needs_zeros = regions
            .regions()
            .iter()
            .any(|r| r.spec.kind.is_hugetlb() || r.spec.resolve != Resolve::Copy);
        // SAFETY: eventfd has no preconditions; the fd is ours.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::Io {
                what: "eventfd",
                source: std::io::Error::last_os_error(),
            });
        }
        let pages = regions.pages();
        let states = PageStateMap::new(pages);
        Ok(Self {
            uffd,
            regions: RwLock::new(regions),
            states,
            source,
            stats: Stats::default(),
            stop: AtomicBool::new(false),
            // SAFETY: eventfd returned a fresh fd.
            wakeup: unsafe { OwnedFd::from_raw_fd(efd) },
            gone: AtomicBool::new(false),
            removed_in_flight: Mutex::new(HashSet::new()),
            removed_count: AtomicUsize::new(0),
            placing: AtomicUsize::new(0),
            cursor: AtomicUsize::new(0),
            recorder: record.then(|| Recorder::new(pages)),
            fault_around,
            zeros: vec![0u8; if needs_zeros { max_page } else { 0 }].into_boxed_slice(),
            fatal: Mutex::new(None),
        })
    }

    /// Whether threads should stop. Relaxed: the flag carries no data; joins synchronise.
    #[inline]
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Asks every thread to stop and wakes the blocked pollers.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes to our eventfd.
        unsafe { libc::write(self.wakeup.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Records a fatal error (the first one wins) and stops.
    pub fn fail(&self, error: Error) {
        let mut fatal = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        fatal.get_or_insert(error);
        drop(fatal);
        self.request_stop();
    }

    #[inline]
    pub fn page(&self, page: usize) -> Option<PageRef> {
        self.regions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_page(page)
    }

    #[inline]
    pub fn page_at(&self, addr: usize) -> Option<PageRef> {
        self.regions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_addr(addr)
    }

    /// Takes `page` out of the removed-in-flight set; true if it was there. The counter
    /// keeps the common case (nothing removed) to one relaxed load.
    fn take_removed(&self, page: usize) -> bool {
        if self.removed_count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut set = self
            .removed_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let hit = set.remove(&page);
        self.removed_count.store(set.len(), Ordering::Relaxed);
        hit
    }

    /// Whether any of `count` pages from `page` is in the removed-in-flight set.
    fn any_removed(&self, page: usize, count: usize) -> bool {
        if self.removed_count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let set = self
            .removed_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        (page..page + count).any(|q| set.contains(&q))
    }

    /// Places a run one page at a time (see `place`).
    fn place_each(
        &self,
        p: &PageRef,
        count: usize,
        content: Content<'_>,
        wake: bool,
        origin: Origin,
    ) -> Placement {
        for i in 0..count {
            let Some(q) = self.page(p.page + i) else {
                return Placement::Dropped;
            };
            let one = match content {
                Content::Data(d) => Content::Data(&d[i * p.size..(i + 1) * p.size]),
                Content::Zero => Content::Zero,
            };
            match self.place(&q, 1, one, wake, origin) {
                Placement::Done => {}
                Placement::Again { .. } => return Placement::Again { done: i * p.size },
                Placement::Dropped => return Placement::Dropped,
            }
        }
        Placement::Done
    }

    fn remember_removed(&self, page: usize) {
        let mut set = self
            .removed_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        set.insert(page);
        self.removed_count.store(set.len(), Ordering::Relaxed);
    }

    /// Places `content` at `p` (which spans `count` pages of the same region) and marks
    /// the pages received. With `wake`, threads waiting on the range are woken.
    pub fn place(
        &self,
        p: &PageRef,
        count: usize,
        content: Content<'_>,
        wake: bool,
        origin: Origin,
    ) -> Placement {
        // SeqCst: pairs with `complete`, which reads this after seeing every page
        // Received; a placement whose page a racing EEXIST already published is then
        // still counted here until its stats are in.
        self.placing.fetch_add(1, Ordering::SeqCst);
        let r = self.place_counted(p, count, content, wake, origin);
        self.placing.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn place_counted(
        &self,
        p: &PageRef,
        count: usize,
        content: Content<'_>,
        wake: bool,
        origin: Origin,
    ) -> Placement {
        let len = p.size * count;
        if count > 1 && self.any_removed(p.page, count) {
            // Part of the run was dropped while in flight: place page by page so those
            // pages get zeros.
            return self.place_each(p, count, content, wake, origin);
        }
        let removed = count == 1 && self.take_removed(p.page);
        let content = if removed { Content::Zero } else { content };
        let result = match (p.resolve, content) {
            (Resolve::Copy, Content::Data(data)) => {
                let mode = if wake {
                    CopyMode::empty()
                } else {
                    CopyMode::DONTWAKE
                };
                // SAFETY: `p.addr..+len` lies in a region registered with this uffd whose
                // content the pager owns: it places exactly the image's bytes.
                unsafe { self.uffd.copy(p.addr, &data[..len], mode) }
            }
            (Resolve::Copy, Content::Zero) if !p.kind.is_hugetlb() => {
                let mode = if wake {
                    ZeropageMode::empty()
                } else {
                    ZeropageMode::DONTWAKE
                };
                self.uffd.zeropage(p.addr, len, mode)
            }
            (Resolve::Copy, Content::Zero) => self.place_zeros_by_copy(p, count, wake),
            (Resolve::Continue { alias }, content) => {
                self.stage_in_page_cache(alias + p.in_region, len, content);
                let mode = if wake {
                    ContinueMode::empty()
                } else {
                    ContinueMode::DONTWAKE
                };
                // SAFETY: the page cache behind `p.addr` now holds the image's bytes.
                unsafe { self.uffd.continue_range(p.addr, len, mode) }
            }
        };
        match result {
            Ok(_) => {
                // Count before publishing Received: whoever sees the page done (e.g.
                // `wait_complete`) then also sees it counted.
                self.account(origin, content, len, count);
                self.mark_received(p.page, count);
                Placement::Done
            }
            Err(UffdError::Exists { .. }) if count > 1 => {
                // Another placer won a page of the run and the kernel stopped there: redo
                // page by page (placed pages meet EEXIST and are marked, the rest copied),
                // never marking the tail received unplaced.
                bump(&self.stats.exists);
                self.place_each(p, count, content, wake, origin)
            }
            Err(UffdError::Exists { .. }) => {
                bump(&self.stats.exists);
                self.mark_received(p.page, count);
                if wake {
                    let _ = self.uffd.wake(p.addr, len);
                }
                Placement::Done
            }
            Err(UffdError::Again { done, .. }) => {
                bump(&self.stats.again);
                if removed {
                    self.remember_removed(p.page);
                }
                let whole = done / p.size;
                if whole > 0 {
                    self.account(origin, content, whole * p.size, whole);
                    self.mark_received(p.page, whole);
                }
                Placement::Again {
                    done: whole * p.size,
                }
            }
            Err(UffdError::ProcessGone { .. }) => {
                self.gone.store(true, Ordering::Relaxed);
                self.request_stop();
                Placement::Dropped
            }
            // ENOENT also means "the layout changed under the operation" (a REMOVE being
            // applied): while the region is still ours, retry like EAGAIN; an UNMAP event
            // unmaps it in the table, and then the page is dropped for good.
            Err(UffdError::RangeGone { .. }) if self.page(p.page).is_some() => {
                bump(&self.stats.again);
                if removed {
                    self.remember_removed(p.page);
                }
                Placement::Again { done: 0 }
            }
            Err(UffdError::RangeGone { .. }) => Placement::Dropped,
            Err(e) => {
                self.fail(e.into());
                Placement::Dropped
            }
        }
    }

    fn place_zeros_by_copy(
        &self,
        p: &PageRef,
        count: usize,
        wake: bool,
    ) -> uffd_core::Result<usize> {
        let mode = if wake {
            CopyMode::empty()
        } else {
            CopyMode::DONTWAKE
        };
        for i in 0..count {
            // SAFETY: as in `place`; zeros are what the image holds here.
            unsafe {
                self.uffd
                    .copy(p.addr + i * p.size, &self.zeros[..p.size], mode)
            }?;
        }
        Ok(count * p.size)
    }

    /// Writes `content` into the page cache through the unregistered alias mapping.
    fn stage_in_page_cache(&self, alias: usize, len: usize, content: Content<'_>) {
        // SAFETY: `alias..alias + len` is the pager's own alias mapping of the region's
        // file (the builder checked it is mapped); no Rust reference points into it.
        unsafe {
            match content {
                Content::Data(data) => {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), alias as *mut u8, len)
                }
                Content::Zero => std::ptr::write_bytes(alias as *mut u8, 0, len),
            }
        }
    }

    fn mark_received(&self, page: usize, count: usize) {
        if count == 1 {
            // A page already received (raced placement, EEXIST) stays so.
            let _ = self.states.mark_received(page);
        } else {
            let _ = self.states.mark_received_range(page, page + count);
        }
    }

    fn account(&self, origin: Origin, content: Content<'_>, bytes: usize, count: usize) {
        let n = count as u64;
        match content {
            Content::Zero => add(&self.stats.placed_zero, n),
            Content::Data(_) => {
                add(&self.stats.bytes, bytes as u64);
                match origin {
                    Origin::Fault => add(&self.stats.placed_fault, n),
                    Origin::Prefetch => add(&self.stats.placed_prefetch, n),
                    Origin::Arrival => add(&self.stats.placed_arrival, n),
                }
            }
        }
    }

    /// Asks the source for `count` pages at `p` (already Requested by the caller) and
    /// places what comes back. `Pending` leaves them to the remote source's placer.
    pub fn fetch_and_place(
        &self,
        p: &PageRef,
        count: usize,
        scratch: &mut [u8],
        wake: bool,
        origin: Origin,
    ) -> Placement {
        let len = p.size * count;
        match self.source.fetch(p.offset, &mut scratch[..len]) {
            Ok(Fetched::Data(data)) => {
                add(&self.stats.source_reads, count as u64);
                self.place(p, count, Content::Data(data), wake, origin)
            }
            Ok(Fetched::Zero) => self.place(p, count, Content::Zero, wake, origin),
            Ok(Fetched::Pending) => Placement::Done,
            Err(e) => {
                bump(&self.stats.source_errors);
                self.fail(e.into());
                Placement::Dropped
            }
        }
    }

    /// Resolves one fault. Returns the page if the caller must follow up: retry it
    /// (EAGAIN), or watch it (someone else requested it) until it leaves Requested.
    pub fn on_fault(
        &self,
        addr: usize,
        flags: FaultFlags,
        scratch: &mut [u8],
        wake: bool,
    ) -> Option<(PageRef, FollowUp)> {
        if flags.contains(FaultFlags::MINOR) {
            bump(&self.stats.faults_minor);
        } else if flags.contains(FaultFlags::WP) {
            bump(&self.stats.faults_wp);
        } else {
            bump(&self.stats.faults_missing);
        }
        let Some(p) = self.page_at(addr) else {
            bump(&self.stats.faults_unknown);
            return None;
        };
        // Relaxed: a hint for the prefetcher's position, not a synchronisation point.
        self.cursor.store(p.page + 1, Ordering::Relaxed);
        let outcome = match self.states.request(p.page) {
            Ok(outcome) => outcome,
            Err(_) => return None, // beyond the map: cannot happen for a looked-up page
        };
        let placement = match outcome {
            RequestOutcome::Requested => {
                if let Some(rec) = &self.recorder {
                    rec.record(p.page);
                }
                let placed = self.fetch_and_place(&p, 1, scratch, wake, Origin::Fault);
                if placed == Placement::Done && self.fault_around > 0 {
                    self.place_around(&p, scratch);
                }
                placed
            }
            RequestOutcome::AlreadyRequested => {
                bump(&self.stats.faults_duplicate);
                // Its requester places and wakes it; the caller watches it anyway, so a
                // requester that gives up (or a wake lost to a race) strands nobody.
                return Some((p, FollowUp::Watch));
            }
            RequestOutcome::AlreadyReceived => {
                bump(&self.stats.faults_wake_only);
                match p.resolve {
                    // Usually the fault raced its placement: the zero page meets EEXIST and
                    // the waiter is woken. But the kernel zaps a REMOVE'd range only after
                    // the event is read, so a placement landing in between is zapped while
                    // the map says Received; then this places the dropped page's content,
                    // zero, instead of waking into the same fault forever.
                    Resolve::Copy => self.place(&p, 1, Content::Zero, wake, Origin::Fault),
                    // Shared memory keeps its page cache across a drop: just wake.
                    Resolve::Continue { .. } => {
                        let _ = self.uffd.wake(p.addr, p.size);
                        Placement::Done
                    }
                }
            }
            RequestOutcome::IsZero => self.place(&p, 1, Content::Zero, wake, Origin::Fault),
        };
        match placement {
            Placement::Again { .. } => Some((p, FollowUp::Retry)),
            _ => None,
        }
    }

    /// Places up to `fault_around` Missing pages after `p` in its region, unwoken.
    fn place_around(&self, p: &PageRef, scratch: &mut [u8]) {
        for k in 1..=self.fault_around {
            let Some(next) = self.page(p.page + k) else {
                break;
            };
            if next.addr != p.addr + k * p.size {
                break; // another region
            }
            if self.states.request(next.page) != Ok(RequestOutcome::Requested) {
                continue;
            }
            // Fault-around is opportunistic: a page it cannot place now (EAGAIN) goes
            // back to Missing, and a later fault or the prefetcher places it.
            if let Placement::Again { .. } =
                self.fetch_and_place(&next, 1, scratch, true, Origin::Prefetch)
            {
                self.unclaim(next.page);
                break;
            }
        }
    }

    /// Returns a page we claimed (Requested) but could not place to Missing, by marking
    /// it received then discarding — both legal transitions — so a later fault asks again.
    pub fn unclaim(&self, page: usize) {
        let _ = self.states.mark_received(page);
        let _ = self.states.discard(page);
    }

    /// Applies a non-fault event. Fork events are returned to the caller (they need a
    /// new engine).
    pub fn on_event(&self, event: Event) -> Option<Uffd> {
        match event {
            Event::Remove { start, end } => {
                bump(&self.stats.events_remove);
                let ranges = self
                    .regions
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .page_ranges(start, end);
                for range in ranges {
                    self.zero_range(range);
                }
            }
            Event::Unmap { start, end } => {
                bump(&self.stats.events_unmap);
                self.regions
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .unmap(start, end);
            }
            Event::Remap { from, to, len } => {
                bump(&self.stats.events_remap);
                self.regions
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remap(from, to, len);
            }
            Event::Fork { uffd } => {
                bump(&self.stats.events_fork);
                return Some(uffd);
            }
            Event::Pagefault { .. } | Event::Unknown { .. } => {}
            _ => {}
        }
        None
    }

    /// After a REMOVE: the range reads as missing and must come back as zeros, never as
    /// image data. Pages in flight (Requested) are remembered and zeroed on placement.
    ///
    /// Known limit: the kernel lets `madvise` zap the range once the REMOVE event has been
    /// *read*, not once it has been handled. With several handler threads, a placement of
    /// a page fetched before the REMOVE may pass its check just before another thread
    /// records the REMOVE and land just after the zap, leaving image data where zeros
    /// belong. A single handler thread (thread / busy-poll mode) orders the two and is
    /// exact; user space cannot close the window for another process's memory.
    fn zero_range(&self, range: std::ops::Range<usize>) {
        if self.states.mark_zero_range(range.start, range.end).is_ok() {
            return;
        }
        let mut set = self
            .removed_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for page in range {
            if self.states.get(page) == Ok(PageState::Requested) {
                set.insert(page);
            }
        }
        self.removed_count.store(set.len(), Ordering::Relaxed);
    }

    /// Marks the image's known-zero ranges Zero in the state map.
    pub fn mark_known_zero(&self) {
        let zero = self.source.zero_ranges();
        if zero.is_empty() {
            return;
        }
        let regions = self.regions.read().unwrap_or_else(|p| p.into_inner());
        for r in regions.regions() {
            let (lo, hi) = (r.spec.image_offset, r.spec.image_offset + r.spec.len as u64);
            let ps = r.spec.page_size as u64;
            for z in &zero {
                let (a, b) = (z.start.max(lo), z.end.min(hi));
                if a >= b {
                    continue;
                }
                // Whole pages only.
                let first = (a - lo).div_ceil(ps) as usize;
                let last = ((b - lo) / ps) as usize;
                if first < last {
                    let _ = self
                        .states
                        .mark_zero_range(r.first_page + first, r.first_page + last);
                }
            }
        }
    }

    /// Whether every page has been placed (Received) or is known zero and placed.
    pub fn complete(&self) -> bool {
        self.states.count(PageState::Received) == self.states.len()
            && self.placing.load(Ordering::SeqCst) == 0
    }
}

/// The order of first faults, for working-set recording. Lock-free and allocation-free
/// after creation, so the SIGBUS path can record too: one slot per page (a page is
/// requested once unless discarded; later requests beyond capacity are dropped).
pub(crate) struct Recorder {
    slots: Box<[std::sync::atomic::AtomicU64]>,
    len: AtomicUsize,
}

impl Recorder {
    fn new(pages: usize) -> Self {
        Self {
            slots: (0..pages)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            len: AtomicUsize::new(0),
        }
    }

    /// Appends `page`. Relaxed: readers take a snapshot only after the threads are joined.
    pub fn record(&self, page: usize) {
        let i = self.len.fetch_add(1, Ordering::Relaxed);
        if let Some(slot) = self.slots.get(i) {
            slot.store(page as u64, Ordering::Relaxed);
        }
    }

    /// The pages recorded, in order.
    pub fn pages(&self) -> Vec<u64> {
        let n = self.len.load(Ordering::Relaxed).min(self.slots.len());
        self.slots[..n]
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect()
    }
}

/// A cloneable handle through which any thread places pages that arrive from a remote
/// source. Addresses are found from the image offset; page states and stats are kept.
///
/// It holds the engine weakly: a remote source's thread keeping a placer does not keep
/// the pager (and its userfaultfd) alive once the [`Pager`](crate::Pager) is gone.
#[derive(Clone)]
pub struct Placer {
    pub(crate) shared: std::sync::Weak<Shared>,
}

impl std::fmt::Debug for Placer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placer").finish_non_exhaustive()
    }
}

/// What [`Placer::place`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page is in memory and its waiters woken.
    Placed,
    /// It was already received; nothing done (a duplicate arrival).
    Duplicate,
    /// No mapped region holds this offset (unmapped meanwhile, or out of range).
    NoRegion,
    /// The pager is stopping or the process is gone.
    Stopped,
}

impl Placer {
    /// Places the page at image offset `offset` (page aligned) with `data` (one page), or
    /// a zero page when `data` is `None`. Retries while the address space is changing.
    pub fn place(&self, offset: u64, data: Option<&[u8]>) -> Result<Placed> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(Placed::Stopped);
        };
        let Some(p) = shared
            .regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_offset(offset)
        else {
            return Ok(Placed::NoRegion);
        };
        if p.offset != offset {
            return Err(Error::BadRegion {
                base: p.addr,
                len: p.size,
                reason: "arrival offset is not page aligned",
            });
        }
        if let Some(d) = data {
            if d.len() != p.size {
                return Err(Error::BadRegion {
                    base: p.addr,
                    len: d.len(),
                    reason: "arrival is not exactly one page",
                });
            }
        }
        let content = match shared.states.get(p.page) {
            Ok(PageState::Received) => return Ok(Placed::Duplicate),
            // Dropped (REMOVE) or known zero: the arrival is stale; the page reads zero.
            Ok(PageState::Zero) => Content::Zero,
            _ => data.map_or(Content::Zero, Content::Data),
        };
        let started = Instant::now();
        loop {
            if shared.stopping() {
                return Ok(Placed::Stopped);
            }
            match shared.place(&p, 1, content, true, Origin::Arrival) {
                Placement::Done => {
                    shared.stats.record_latency(started.elapsed());
                    return Ok(Placed::Placed);
                }
                Placement::Again { .. } => std::thread::sleep(std::time::Duration::from_micros(50)),
                Placement::Dropped => return Ok(Placed::Stopped),
            }
        }
    }

    /// Places a run of arriving pages, `data` being whole pages from image offset `offset`,
    /// with one ioctl per stretch of pages still to be placed (Missing or Requested);
    /// received pages are skipped, known-zero ones get zeros (as in [`place`]). Returns
    /// how many pages were placed, or `None` if the pager is gone or stopping.
    ///
    /// [`place`]: Placer::place
    pub fn place_run(&self, offset: u64, data: &[u8]) -> Result<Option<usize>> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(None);
        };
        let lookup = |off: u64| {
            shared
                .regions
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .by_offset(off)
        };
        let Some(p) = lookup(offset) else {
            return Ok(None);
        };
        if p.offset != offset || data.len() % p.size != 0 || data.is_empty() {
            return Err(Error::BadRegion {
                base: p.addr,
                len: data.len(),
                reason: "an arriving run must start on a page and hold whole pages",
            });
        }
        let ps = p.size;
        let n = data.len() / ps;
        let contiguous = lookup(offset + ((n - 1) * ps) as u64)
            .is_some_and(|last| last.page == p.page + n - 1 && last.addr == p.addr + (n - 1) * ps);
        let one_by_one = |from: usize| -> Result<Option<usize>> {
            let mut placed = 0;
            for i in from..n {
                match self.place(offset + (i * ps) as u64, Some(&data[i * ps..(i + 1) * ps]))? {
                    Placed::Placed => placed += 1,
                    Placed::Duplicate => {}
                    Placed::NoRegion | Placed::Stopped => return Ok(None),
                }
            }
            Ok(Some(placed))
        };
        if !contiguous {
            return one_by_one(0);
        }
        let open = |i: usize| {
            matches!(
                shared.states.get(p.page + i),
                Ok(PageState::Missing | PageState::Requested)
            )
        };
        let mut placed = 0;
        let mut i = 0;
        while i < n {
            if shared.stopping() {
                return Ok(None);
            }
            if !open(i) {
                // Received: a duplicate. Zero: dropped here meanwhile, `place` zeroes it.
                if let Ok(PageState::Zero) = shared.states.get(p.page + i) {
                    let off = offset + (i * ps) as u64;
                    if self.place(off, Some(&data[i * ps..(i + 1) * ps]))? == Placed::Placed {
                        placed += 1;
                    }
                }
                i += 1;
                continue;
            }
            let mut j = i + 1;
            while j < n && open(j) {
                j += 1;
            }
            let Some(q) = shared.page(p.page + i) else {
                return Ok(None);
            };
            match shared.place(
                &q,
                j - i,
                Content::Data(&data[i * ps..j * ps]),
                true,
                Origin::Arrival,
            ) {
                Placement::Done => placed += j - i,
                // The address space is changing: the careful path, page by page.
                Placement::Again { .. } => {
                    return Ok(one_by_one(i)?.map(|rest| placed + rest));
                }
                Placement::Dropped => return Ok(None),
            }
            i = j;
        }
        Ok(Some(placed))
    }

    /// Reports that a remote source can no longer deliver pages it answered
    /// [`Fetched::Pending`](crate::Fetched::Pending) for (retries exhausted, data that failed
    /// verification): the pager records the error, stops, and returns it from
    /// [`Pager::stop`](crate::Pager::stop). Faults left unserved are released when the
    /// userfaultfd closes; an embedder serving another process should end that process.
    pub fn fail(&self, error: crate::SourceError) {
        if let Some(shared) = self.shared.upgrade() {
            bump(&shared.stats.source_errors);
            shared.fail(error.into());
        }
    }

    /// Whether page `page` (index in the state map) is still to be placed; `None` once
    /// the pager is gone.
    pub fn state(&self, page: usize) -> Option<PageState> {
        self.shared.upgrade()?.states.get(page).ok()
    }
}
