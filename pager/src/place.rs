//! Placement: putting a page's content into memory with one ioctl (COPY, ZEROPAGE, MOVE of
//! pages the caller gave up, or a page-cache write and CONTINUE), publishing it in the page
//! states and the counters, and turning the kernel's answers into what the caller does next:
//! EEXIST → mark and wake, EAGAIN → retry once the events are read, ENOENT → a run placed
//! page by page (over two VMAs), a page left to the process (`silent_unmaps`) or retried
//! while its region is ours for [`RANGE_GONE_GRACE`], then failed; ESRCH → process gone.
//!
//! Every placement runs inside the [gate](crate::gate), from the decision of what to put
//! there to the end of its ioctl; a page a REMOVE dropped (removed bit set, or Zero) gets
//! zeros, never the image's bytes. Async-signal-safe: atomics and ioctls only.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use uffd_core::{
    ContinueMode, CopyMode, Error as UffdError, Features, MemoryKind, MoveMode, Op, ZeropageMode,
};

use crate::error::SourceError;
use crate::region::{PageRef, Resolve};
use crate::shared::Shared;
use crate::stats::{add, bump};
use page_state::PageState;

/// What to put in a page.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Content<'a> {
    /// The image's bytes (exactly the placement's length).
    Data(&'a [u8]),
    /// The image's bytes in whole pages at this address, which the caller gave up
    /// (`Placer::place_run_moving`): moved into place with `UFFDIO_MOVE` where the region
    /// allows it (`Shared::movable`), copied from there otherwise or if the kernel refuses.
    Move(usize),
    /// Zeros.
    Zero,
    /// MINOR mode only: map what the page cache already holds (a page the workload
    /// had, unmapped by `MADV_DONTNEED` on shared memory), writing nothing.
    Present,
}

/// Who placed a page (for the stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    Fault,
    Prefetch,
    Arrival,
}

/// One placement: `count` pages from `at` (all in `at`'s region), what goes there, whether
/// the threads waiting on them are woken, and who places them (for the stats).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request<'a> {
    /// The first page.
    pub at: PageRef,
    /// Pages from `at`, in the same region.
    pub count: usize,
    /// What to put there (`Data`: exactly `count` pages' bytes).
    pub content: Content<'a>,
    /// Wake the threads waiting on the range (else DONTWAKE, for a batch woken at once).
    pub wake: bool,
    /// Who places them.
    pub origin: Origin,
}

/// How long a page the kernel calls gone (ENOENT) while the region table still holds it is
/// retried, from the first ENOENT ([`GoneSince`]): long enough for the UNMAP or REMAP event behind a
/// transient ENOENT to be read (the kernel looks the VMA up before it checks for pending
/// events), then the refusal is a failure — the range changed without the pager being told.
pub(crate) const RANGE_GONE_GRACE: Duration = Duration::from_secs(1);

/// The result of one placement attempt.
#[derive(Debug)]
pub(crate) enum Placement {
    /// Placed now, or found already present (EEXIST, then woken).
    Done,
    /// EAGAIN (or ENOENT while the region is ours): an address-space change is pending;
    /// the first `done` pages were placed. Retry the rest after the events are read.
    /// `gone`: it was ENOENT, from `op` — retried only for [`RANGE_GONE_GRACE`]
    /// ([`Placement::or_give_up`]).
    Again { done: usize, gone: Option<Op> },
    /// The page's range is gone (unmapped) or the process exited: nothing to do.
    Dropped,
    /// A remote source was asked (it answered `Pending`): the page arrives through the
    /// placer, which wakes its waiters.
    Asked,
    /// The kernel refused with anything else: the caller reports it (its own way: the
    /// SIGBUS handler may not lock or allocate).
    Failed(UffdError),
    /// The source failed; reported like `Failed`.
    SourceFailed(SourceError),
}

/// When a retried placement first met ENOENT: its grace runs from there, not from the
/// attempt's start (a slow fetch before it is no sign of a range gone).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct GoneSince(Option<Instant>);

impl Placement {
    /// An ENOENT retry (`Again` with `gone`) refused for [`RANGE_GONE_GRACE`] since the
    /// first ENOENT (`gone`, kept by the caller across its retries) becomes the failure
    /// it is; anything else is returned as it is. Every caller that retries a placement
    /// passes its result here.
    pub fn or_give_up(self, gone: &mut GoneSince) -> Placement {
        match self {
            Placement::Again { gone: Some(op), .. } => {
                // clock_gettime(2): async-signal-safe.
                let first = *gone.0.get_or_insert_with(Instant::now);
                match first.elapsed() >= RANGE_GONE_GRACE {
                    true => Placement::Failed(UffdError::RangeGone { op }),
                    false => self,
                }
            }
            other => other,
        }
    }
}

impl Shared {
    /// Places `req.content` at `req.at` (which spans `req.count` pages of the same region)
    /// and marks the pages received. With `req.wake`, threads waiting on the range are woken.
    pub fn place(&self, req: Request<'_>) -> Placement {
        let _in = self.gate.enter();
        self.place_in_gate(req)
    }

    /// Whether page `page`'s next placement must be zeros whatever was fetched: a REMOVE
    /// dropped it (removed bit, or Zero), or it is Received (placed, then dropped: a fault
    /// there means the zap took it; zeros meet EEXIST otherwise).
    fn must_be_zero(&self, page: usize) -> bool {
        self.removed.test(page)
            || matches!(
                self.states.get(page),
                Ok(PageState::Zero | PageState::Received)
            )
    }

    /// What actually goes into page `p` for a placement of `content`: consumes its
    /// removed bit (returned, to be restored if the placement must be retried).
    fn decide<'a>(&self, p: &PageRef, content: Content<'a>) -> (Content<'a>, bool) {
        let removed = self.removed.test(p.page) && self.removed.clear(p.page);
        if removed {
            bump(&self.stats.removed_in_flight);
        }
        let state = self.states.get(p.page);
        let dropped = matches!(state, Ok(PageState::Zero | PageState::Received));
        let content = match (p.resolve, content) {
            (Resolve::Copy, Content::Data(_) | Content::Move(_)) if removed || dropped => {
                Content::Zero
            }
            (Resolve::Copy, Content::Present) => Content::Zero,
            // Shared memory: a page placed before may be mapped (a fault that raced its
            // placement) or unmapped with its page cache intact (MADV_DONTNEED): map it
            // as it is, never write over it. If its page is gone too, zeros.
            (Resolve::Continue { .. }, _) if state == Ok(PageState::Received) => Content::Present,
            (Resolve::Continue { .. }, Content::Data(_))
                if removed || state == Ok(PageState::Zero) =>
            {
                Content::Zero
            }
            (_, content) => content,
        };
        (content, removed)
    }

    /// [`place`](Self::place) with the gate already entered.
    fn place_in_gate(&self, req: Request<'_>) -> Placement {
        let req = match req.content {
            Content::Move(src) if !self.movable(&req.at) => Request {
                // SAFETY: `Content::Move`'s pages, nothing moved out of them yet.
                content: Content::Data(unsafe { moving(src, req.at.size * req.count) }),
                ..req
            },
            _ => req,
        };
        let (first, count) = (req.at.page, req.count);
        if count > 1 {
            let any_zero = (first..first + count).any(|q| self.must_be_zero(q));
            if any_zero && !matches!(req.content, Content::Zero) {
                // Part of the run was dropped meanwhile: page by page, so those get zeros.
                return self.place_each_in_gate(req);
            }
            return self.place_one_ioctl(req, false);
        }
        let (content, removed) = self.decide(&req.at, req.content);
        self.place_one_ioctl(Request { content, ..req }, removed)
    }

    /// Places a run one page at a time, each decided on its own.
    fn place_each_in_gate(&self, req: Request<'_>) -> Placement {
        let size = req.at.size;
        for i in 0..req.count {
            let Some(q) = self.page(req.at.page + i) else {
                return Placement::Dropped;
            };
            let one = match req.content {
                Content::Data(d) => Content::Data(&d[i * size..(i + 1) * size]),
                Content::Move(src) => Content::Move(src + i * size),
                other => other,
            };
            let (one, removed) = self.decide(&q, one);
            let one = Request {
                at: q,
                count: 1,
                content: one,
                ..req
            };
            match self.place_one_ioctl(one, removed) {
                Placement::Done => {}
                Placement::Again { gone, .. } => return Placement::Again { done: i, gone },
                other => return other,
            }
        }
        Placement::Done
    }

    /// One placement ioctl for the request's pages, and what follows from its answer.
    /// `removed`: the page's removed bit was consumed (restored on a retry).
    fn place_one_ioctl(&self, req: Request<'_>, removed: bool) -> Placement {
        let Request {
            at: ref p,
            count,
            content,
            wake,
            origin,
        } = req;
        let len = p.size * count;
        let result = match (p.resolve, content) {
            (Resolve::Copy, Content::Data(data)) => {
                // SAFETY: `p.addr..+len` lies in one region, whose content is the pager's to
                // decide (the embedder's contract on `PagerBuilder::region`, or a `Mapping`
                // the pager keeps alive); COPY only fills pages still missing.
                unsafe { self.uffd.copy(p.addr, &data[..len], copy_mode(wake)) }
            }
            (Resolve::Copy, Content::Move(src)) => {
                let mode = if wake {
                    MoveMode::empty()
                } else {
                    MoveMode::DONTWAKE
                };
                // SAFETY: as for COPY, the destination is the pager's to fill and MOVE only
                // fills pages still missing; the source pages are the caller's, given up
                // for this (`Placer::place_run_moving` holds them exclusively borrowed).
                unsafe { self.uffd.move_pages(p.addr, src, len, mode) }
            }
            (Resolve::Copy, Content::Zero | Content::Present) if !p.kind.is_hugetlb() => {
                let mode = if wake {
                    ZeropageMode::empty()
                } else {
                    ZeropageMode::DONTWAKE
                };
                // SAFETY: the range is the pager's to fill, as for COPY (its regions'
                // contract, or mappings it checked): anonymous or shared memory whose
                // missing pages the pager decides, never a private mapping of a file.
                unsafe { self.uffd.zeropage(p.addr, len, mode) }
            }
            (Resolve::Copy, _) => self.place_zeros_by_copy(p, count, wake),
            (Resolve::Continue { alias }, content) => {
                self.continue_with(alias + p.in_region, p.addr, len, content, wake)
            }
        };
        if let (Content::Move(src), Err(e)) = (content, &result) {
            if !matches!(
                e,
                UffdError::Exists { .. } | UffdError::Again { .. } | UffdError::ProcessGone { .. }
            ) {
                // Refused (a source page not exclusively ours, a hole in it: EBUSY,
                // ENOENT…): nothing moved, so the pages still hold the data: copy them.
                bump(&self.stats.move_refused);
                // SAFETY: `Content::Move`'s pages; the refused move moved none of them.
                let data = unsafe { moving(src, len) };
                let req = Request {
                    content: Content::Data(data),
                    ..req
                };
                return self.place_one_ioctl(req, removed);
            }
        }
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
                self.place_each_in_gate(req)
            }
            Err(UffdError::Exists { .. }) => {
                bump(&self.stats.exists);
                self.mark_received(p.page, count);
                if wake {
                    return self.wake(p.addr, len);
                }
                Placement::Done
            }
            Err(UffdError::Again { done, .. }) => self.again(&req, removed, done, None),
            Err(UffdError::ProcessGone { .. }) => {
                self.gone.store(true, std::sync::atomic::Ordering::Relaxed);
                self.request_stop();
                Placement::Dropped
            }
            // No VMA holds the whole range: a run over two VMAs of one region (an
            // embedder's mprotect split it, or it spans two mappings) goes page by page.
            Err(UffdError::RangeGone { .. }) if count > 1 && self.page(p.page).is_some() => {
                self.place_each_in_gate(req)
            }
            // `silent_unmaps` (no UNMAP or REMAP event can follow): the process took the
            // page back for good. Received, so nothing places it again; counted apart; a
            // thread that faulted there before is woken to fault on what is mapped now.
            // Not once stopping: a late placement's ENOENT is then our let-go (release.rs).
            Err(UffdError::RangeGone { .. })
                if self.silent_unmaps && !self.stopping() && self.page(p.page).is_some() =>
            {
                add(&self.stats.gone_silently, count as u64);
                self.mark_received(p.page, count);
                if wake {
                    return self.wake(p.addr, len);
                }
                Placement::Done
            }
            // ENOENT also means "the layout changed under the operation" (an UNMAP or REMAP
            // whose event is not read yet): while the region is still ours, retry like
            // EAGAIN, bounded by the caller (`or_give_up`); an UNMAP event unmaps it in the
            // table, and then the page is dropped for good.
            Err(UffdError::RangeGone { op }) if self.page(p.page).is_some() => {
                self.again(&req, removed, 0, Some(op))
            }
            Err(UffdError::RangeGone { .. }) => Placement::Dropped,
            Err(e) => Placement::Failed(e),
        }
    }

    /// The kernel stopped after `done` bytes: count and publish the whole pages placed,
    /// put back a consumed removed bit, and ask for a retry of the rest (`gone`: ENOENT).
    fn again(&self, req: &Request<'_>, removed: bool, done: usize, gone: Option<Op>) -> Placement {
        bump(&self.stats.again);
        let p = &req.at;
        let whole = done / p.size;
        if removed && whole == 0 {
            self.removed.set(p.page);
        }
        if whole > 0 {
            self.account(req.origin, req.content, whole * p.size, whole);
            self.mark_received(p.page, whole);
        }
        Placement::Again { done: whole, gone }
    }

    /// Zero pages where ZEROPAGE cannot be used (hugetlb): COPY from the zero buffer.
    fn place_zeros_by_copy(
        &self,
        p: &PageRef,
        count: usize,
        wake: bool,
    ) -> uffd_core::Result<usize> {
        for i in 0..count {
            // SAFETY: as in `place_one_ioctl`; zeros are what the page holds now.
            if let Err(e) = unsafe {
                self.uffd
                    .copy(p.addr + i * p.size, &self.zeros[..p.size], copy_mode(wake))
            } {
                return Err(match e {
                    UffdError::Again { op, done } => UffdError::Again {
                        op,
                        done: i * p.size + done,
                    },
                    e => e,
                });
            }
        }
        Ok(count * p.size)
    }

    /// MINOR mode: writes `content` into the page cache through the alias, then maps it.
    /// `Present` writes nothing; if the page cache has no page there (a hole punched),
    /// zeros are written first.
    fn continue_with(
        &self,
        alias: usize,
        addr: usize,
        len: usize,
        content: Content<'_>,
        wake: bool,
    ) -> uffd_core::Result<usize> {
        let mode = if wake {
            ContinueMode::empty()
        } else {
            ContinueMode::DONTWAKE
        };
        let bytes = match content {
            Content::Data(data) => &data[..len],
            // Not reached (`place_in_gate` copies pages it cannot move), but a copy is right.
            // SAFETY: `Content::Move`'s pages, nothing moved out of them.
            Content::Move(src) => unsafe { moving(src, len) },
            Content::Zero => &self.zeros[..len.min(self.zeros.len())],
            Content::Present => {
                // SAFETY: the page cache behind `addr` holds what the page must show.
                match unsafe { self.uffd.continue_range(addr, len, mode) } {
                    Err(UffdError::Os {
                        errno: Errno::EFAULT,
                        ..
                    }) => &self.zeros[..len.min(self.zeros.len())],
                    other => return other,
                }
            }
        };
        for off in (0..len).step_by(bytes.len().max(1)) {
            let n = bytes.len().min(len - off);
            // SAFETY: `alias..alias + len` lies in the region's alias, which `start` checked
            // (maps.rs) is a writable shared mapping, in this process, of the region's own
            // file at the same offsets, overlapping no region (or made by the pager for a
            // `mapping_minor` region); the region's content, which the pager decides. Its
            // pages are not mapped in the region yet (a mapped page is Received and never
            // written here) and only the claimant writes them.
            unsafe { crate::sigsafe::copy_or_efault(alias + off, &bytes[..n]) }?;
        }
        // SAFETY: the page cache behind `addr` now holds the bytes the page must show.
        unsafe { self.uffd.continue_range(addr, len, mode) }
    }

    /// Wakes the threads waiting on `[addr, addr + len)`. A wake the kernel refuses is
    /// returned as a failure (those threads would stay blocked), except when the process
    /// is gone (stop) or the range is (nobody waits there any more). Async-signal-safe.
    pub fn wake(&self, addr: usize, len: usize) -> Placement {
        #[cfg(feature = "fault-injection")]
        if crate::inject::wake_fails() {
            return Placement::Failed(UffdError::Os {
                op: uffd_core::Op::Wake,
                errno: Errno::EINVAL,
            });
        }
        match self.uffd.wake(addr, len) {
            Ok(()) | Err(UffdError::RangeGone { .. }) => Placement::Done,
            Err(UffdError::ProcessGone { .. }) => {
                self.gone.store(true, std::sync::atomic::Ordering::Relaxed);
                self.request_stop();
                Placement::Dropped
            }
            Err(e) => Placement::Failed(e),
        }
    }

    fn mark_received(&self, page: usize, count: usize) {
        let _ = self.states.mark_received_range(page, page + count); // a received one stays
                                                                     // Faults a remote source answered later are timed now that their page is in.
        self.pending.placed(page, count, &self.stats);
        self.ring(); // whoever waits on it (bell.rs) goes on
    }

    fn account(&self, origin: Origin, content: Content<'_>, bytes: usize, count: usize) {
        let n = count as u64;
        match content {
            Content::Zero => add(&self.stats.placed_zero, n),
            Content::Present => {}
            Content::Data(_) | Content::Move(_) => {
                if let Content::Move(_) = content {
                    add(&self.stats.placed_moved, n);
                }
                add(&self.stats.bytes, bytes as u64);
                match origin {
                    Origin::Fault => add(&self.stats.placed_fault, n),
                    Origin::Prefetch => add(&self.stats.placed_prefetch, n),
                    Origin::Arrival => add(&self.stats.placed_arrival, n),
                }
            }
        }
    }

    /// Whether pages placed at `p` may be moved in rather than copied: private anonymous
    /// memory resolved by copy (`UFFDIO_MOVE` takes nothing else), and a userfaultfd
    /// opened with `UFFD_FEATURE_MOVE`.
    fn movable(&self, p: &PageRef) -> bool {
        p.resolve == Resolve::Copy
            && p.kind == MemoryKind::Anon
            && self.uffd.features().contains(Features::MOVE)
    }
}

/// The bytes of `len` bytes of pages at `src` that a `Content::Move` names.
///
/// # Safety
/// `src..src + len` are pages `Placer::place_run_moving` holds exclusively borrowed, and
/// the slice must not outlive the placement (nothing else reads or writes them meanwhile;
/// a page moved out of them reads zeros afterwards, which no slice spans).
unsafe fn moving<'a>(src: usize, len: usize) -> &'a [u8] {
    // SAFETY: the caller's.
    unsafe { std::slice::from_raw_parts(src as *const u8, len) }
}

fn copy_mode(wake: bool) -> CopyMode {
    let mut mode = CopyMode::empty();
    mode.set(CopyMode::DONTWAKE, !wake);
    mode
}
