//! A fault's decision: the page-state map says what to do with it — ask the source (the
//! first fault on a missing page), wait for whoever asked (requested), only wake or put a
//! dropped page back as zeros (received), or place a zero page (zero) — then the page is
//! fetched and [placed](crate::place), and fault-around brings the pages after it: a run
//! claimed and placed with one fetch and one ioctl, doubling while the faults stay
//! sequential (readahead, as the kernel does for files), so a sequential fault stream
//! becomes 2 MiB placements.
//!
//! Everything here is async-signal-safe (atomics, the source's `fetch`, placement ioctls):
//! the SIGBUS handler takes the same path. Failures are returned, never logged here.

use std::sync::atomic::Ordering;
use std::time::Duration;

use page_state::{PageState, RequestOutcome};
use uffd_core::FaultFlags;

use crate::place::{Content, GoneSince, Origin, Placement, Request};
use crate::region::{PageRef, Resolve};
use crate::shared::Shared;
use crate::sigsafe;
use crate::source::Fetched;
use crate::stats::{add, bump};

/// The largest fault-around run, in bytes (the window doubles up to this).
pub(crate) const MAX_AROUND_BYTES: usize = 2 << 20;

/// A fault on a page the background prefetcher claimed from a local source waits this
/// long, then places the page itself: the prefetcher runs at SCHED_IDLE and a busy
/// workload can starve it while it holds its claim (priority inversion). Claims of
/// handler threads are waited for; a remote source's page is never asked twice.
pub(crate) const TAKE_OVER_AFTER: Duration = Duration::from_millis(1);

/// What became of a fault.
#[derive(Debug)]
pub(crate) enum FaultOutcome {
    /// Placed (or found placed): the thread can be woken and its latency counted.
    Resolved,
    /// Asked of a remote source: the page arrives through the placer, which wakes it.
    Asked,
    /// The caller must follow up on this page.
    FollowUp(PageRef, FollowUp),
    /// Could not be served (fatal error, reported through the returned placement).
    Failed(Placement),
}

/// What a handler must do after a fault it could not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FollowUp {
    /// EAGAIN: retry the placement once the pending events are read.
    Retry,
    /// Another party requested the page: wake the fault once the page leaves Requested.
    Watch,
    /// A forked child's fault on shared memory whose page the parent's engine has not
    /// placed yet: follow the parent's page up as `Retry` (`retry`: its placement met
    /// EAGAIN) or `Watch` says, then map it here (`parent.rs`). Waits for the parent's
    /// placement without polling (the parent rings the child's bell).
    Parent { retry: bool },
}

impl FollowUp {
    /// Whether the follow-up retries a placement (as opposed to waiting for someone else's).
    pub fn retries(self) -> bool {
        matches!(self, FollowUp::Retry | FollowUp::Parent { retry: true })
    }
}

impl Shared {
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
            // A source bug, not a panic in the placement (which would abort the SIGBUS path).
            Ok(Fetched::Data(data)) if data.len() != len => {
                bump(&self.stats.source_errors);
                Placement::SourceFailed(crate::SourceError {
                    what: "the source answered a length other than asked",
                    offset: p.offset,
                    // An OS error, not a message: built without allocating (SIGBUS path).
                    source: std::io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32),
                })
            }
            Ok(Fetched::Data(data)) => {
                add(&self.stats.source_reads, count as u64);
                self.place(Request {
                    at: *p,
                    count,
                    content: Content::Data(data),
                    wake,
                    origin,
                })
            }
            Ok(Fetched::Zero) => self.place(Request {
                at: *p,
                count,
                content: Content::Zero,
                wake,
                origin,
            }),
            Ok(Fetched::Pending) if self.pending_is_fatal => {
                // A child's engine never attached its parent's source: nothing would ever
                // place this page. (Child engines run in thread mode: `fail` may lock.)
                self.fail(crate::Error::ChildSourcePending { offset: p.offset });
                Placement::Dropped
            }
            Ok(Fetched::Pending) => {
                // Relaxed: a one-way flag the fault path reads as a hint.
                self.remote.store(true, Ordering::Relaxed);
                Placement::Asked
            }
            Err(e) => {
                bump(&self.stats.source_errors);
                Placement::SourceFailed(e)
            }
        }
    }

    /// Resolves one fault (`gone`: when its retries first met ENOENT, kept across them:
    /// they end [`RANGE_GONE_GRACE`](crate::place::RANGE_GONE_GRACE) after);
    /// `scratch` holds at least one page plus a fault-around run.
    pub fn on_fault(
        &self,
        addr: usize,
        flags: FaultFlags,
        scratch: &mut [u8],
        wake: bool,
        gone: &mut GoneSince,
    ) -> FaultOutcome {
        if flags.contains(FaultFlags::MINOR) {
            bump(&self.stats.faults_minor);
        } else if flags.contains(FaultFlags::WP) {
            bump(&self.stats.faults_wp);
        } else {
            bump(&self.stats.faults_missing);
        }
        let Some(p) = self.page_at(addr) else {
            bump(&self.stats.faults_unknown);
            return FaultOutcome::Resolved;
        };
        if let (Resolve::Continue { .. }, Some(parent)) = (p.resolve, &self.parent) {
            return self.on_shared_fault(parent, p, scratch, wake, gone);
        }
        // Relaxed: a hint for the prefetcher's position, not a synchronisation point.
        self.cursor.store(p.page + 1, Ordering::Relaxed);
        let Ok(outcome) = self.states.request(p.page) else {
            return FaultOutcome::Resolved; // in range: looked up above
        };
        let placement = match outcome {
            RequestOutcome::Requested => {
                if let Some(rec) = &self.recorder {
                    rec.record(p.page);
                }
                let placed = self.fetch_and_place(&p, 1, scratch, wake, Origin::Fault);
                let around = self.fault_around > 0 || self.readahead;
                if matches!(placed, Placement::Done | Placement::Asked) && around {
                    if let Err(failed) = self.place_around(&p, scratch) {
                        return FaultOutcome::Failed(failed);
                    }
                }
                placed
            }
            RequestOutcome::AlreadyRequested => {
                bump(&self.stats.faults_duplicate);
                // Asked before (perhaps by the prefetcher, behind other pages): a waiting
                // thread now needs it first.
                self.source.prioritize(p.offset);
                // Its requester places and wakes it; the caller watches it anyway, so a
                // requester that gives up (or a wake lost to a race) strands nobody.
                return FaultOutcome::FollowUp(p, FollowUp::Watch);
            }
            RequestOutcome::AlreadyReceived => {
                bump(&self.stats.faults_wake_only);
                self.place(Request {
                    at: p,
                    count: 1,
                    content: self.received_again(&p),
                    wake,
                    origin: Origin::Fault,
                })
            }
            // Zero even in a MINOR region whose page cache holds a page: a Zero page was
            // never placed (a page placed, then dropped, stays Received there: events.rs),
            // so what the cache holds is stale, not the workload's.
            RequestOutcome::IsZero => self.place(Request {
                at: p,
                count: 1,
                content: Content::Zero,
                wake,
                origin: Origin::Fault,
            }),
        };
        match placement.or_give_up(gone) {
            Placement::Done | Placement::Dropped => FaultOutcome::Resolved,
            Placement::Asked => FaultOutcome::Asked,
            Placement::Again { .. } => FaultOutcome::FollowUp(p, FollowUp::Retry),
            failed @ (Placement::Failed(_) | Placement::SourceFailed(_)) => {
                FaultOutcome::Failed(failed)
            }
        }
    }

    /// What a fault on a Received page gets. Usually the fault raced its placement and
    /// this meets EEXIST and wakes it; otherwise the page was dropped after it was placed
    /// (the kernel zaps a REMOVE'd range after the event is read, or nobody told us): a
    /// dropped private page reads zero, while shared memory keeps its page cache and is
    /// mapped again as it is (zeros only if the cache lost it too).
    pub fn received_again(&self, p: &PageRef) -> Content<'static> {
        match p.resolve {
            Resolve::Continue { .. } => Content::Present,
            Resolve::Copy => Content::Zero,
        }
    }

    /// The fault-around window for a fault on `page`: with readahead, doubled when the
    /// fault lands right after the previous run (a sequential stream); `fault_around`
    /// otherwise (0: nothing around a lone fault).
    fn around_window(&self, p: &PageRef) -> usize {
        let max = (MAX_AROUND_BYTES / p.size).max(1);
        // Relaxed: a heuristic's memory; a race only picks another window size.
        let sequential = self.around_next.load(Ordering::Relaxed) == p.page;
        let window = if sequential && self.readahead {
            (self.around_window.load(Ordering::Relaxed).max(1) * 2).min(max)
        } else {
            self.fault_around.min(max)
        };
        self.around_window.store(window, Ordering::Relaxed);
        window
    }

    /// Places the run of Missing pages after `p` (one fetch, one ioctl), woken.
    /// Opportunistic: pages it cannot place now go back to Missing.
    fn place_around(&self, p: &PageRef, scratch: &mut [u8]) -> Result<(), Placement> {
        let window = self.around_window(p).min(scratch.len() / p.size);
        let Some((first, count)) = self.claim_run(p.page + 1, window, Some(p)) else {
            self.around_next.store(p.page + 1, Ordering::Relaxed);
            return Ok(());
        };
        let placed = self.place_claimed(&first, count, scratch, Origin::Prefetch, false)?;
        self.around_next
            .store(first.page + placed, Ordering::Relaxed);
        Ok(())
    }

    /// Claims up to `max` contiguous Missing pages from `page` in one region
    /// (missing → requested each); `after`, when given, must be the page just before
    /// (same region). Returns the first page and how many were claimed.
    pub fn claim_run(
        &self,
        page: usize,
        max: usize,
        after: Option<&PageRef>,
    ) -> Option<(PageRef, usize)> {
        let first = self.page(page)?;
        if after.is_some_and(|a| !a.is_followed_by(&first)) || max == 0 {
            return None;
        }
        if self.states.request(page) != Ok(RequestOutcome::Requested) {
            return None;
        }
        let mut prev = first;
        let mut count = 1;
        while count < max {
            match self.page(page + count) {
                Some(next) if prev.is_followed_by(&next) => prev = next,
                _ => break,
            }
            if self.states.request(page + count) != Ok(RequestOutcome::Requested) {
                break;
            }
            count += 1;
        }
        Some((first, count))
    }

    /// Fetches and places a run the caller claimed. With `retry`, an EAGAIN waits for
    /// the pending events and goes on; without, it stops. Pages not placed (nor handed
    /// to a remote source) are released. Returns how many were; a fatal failure is
    /// returned for the caller to report (its own way: the SIGBUS handler may not lock).
    pub fn place_claimed(
        &self,
        first: &PageRef,
        count: usize,
        scratch: &mut [u8],
        origin: Origin,
        retry: bool,
    ) -> Result<usize, Placement> {
        let mut done = 0;
        let mut failed = None;
        let mut gone = GoneSince::default();
        while done < count && !self.stopping() {
            // An UNMAP may have taken the region away since the pages were claimed.
            let Some(at) = self.page(first.page + done) else {
                break;
            };
            match self
                .fetch_and_place(&at, count - done, scratch, true, origin)
                .or_give_up(&mut gone)
            {
                Placement::Done | Placement::Asked => done = count,
                Placement::Again { done: more, .. } => {
                    done += more;
                    if !retry {
                        break;
                    }
                    // A REMOVE is pending: the event reader applies it; wait and retry.
                    sigsafe::sleep(Duration::from_micros(200));
                }
                Placement::Dropped => break,
                other => {
                    failed = Some(other);
                    break;
                }
            }
        }
        for page in first.page + done..first.page + count {
            self.release(page);
        }
        match failed {
            Some(f) => Err(f),
            None => Ok(done),
        }
    }

    /// A fault at `addr`, read at `at`, was left to a remote source: time it until its
    /// page is placed (at once, if it already was).
    pub fn asked(&self, addr: usize, at: std::time::Instant) {
        let Some(p) = self.page_at(addr) else {
            return;
        };
        self.pending.asked(p.page, at);
        if self.states.get(p.page) == Ok(PageState::Received) {
            self.pending.placed(p.page, 1, &self.stats);
        }
    }

    /// Whether a fault that has waited `waited` on page `page` (Requested by someone
    /// else) places it itself: only a local page the starved prefetcher holds (see
    /// [`TAKE_OVER_AFTER`]).
    pub fn may_take_over(&self, page: usize, waited: Duration) -> bool {
        // Relaxed: a one-way flag read as a hint.
        waited >= TAKE_OVER_AFTER
            && !self.remote.load(Ordering::Relaxed)
            && self.background.test(page)
    }

    /// Places the page at `p`, which the starved prefetcher holds ([`may_take_over`]), and
    /// the rest of the prefetcher's run after it — the pages still Requested and in its
    /// in-flight run, as many as `scratch` holds — with one fetch and one ioctl. A
    /// prefetcher that lost its CPU while holding a run then stalls the fault stream once,
    /// not once per page of the run (a sequential workload would otherwise wait
    /// [`TAKE_OVER_AFTER`] for each of its pages). The prefetcher's own placement of the
    /// run later meets EEXIST, page by page. Handlers' scratch holds a run only with
    /// readahead or fault-around on (as `uffdkit` runs); otherwise one page is taken.
    /// Async-signal-safe.
    ///
    /// [`may_take_over`]: Self::may_take_over
    pub fn take_over(&self, p: &PageRef, scratch: &mut [u8]) -> Placement {
        let max = (scratch.len() / p.size).max(1);
        let (mut last, mut count) = (*p, 1);
        while count < max {
            let q = p.page + count;
            match self.page(q) {
                Some(next)
                    if last.is_followed_by(&next)
                        && self.background.test(q)
                        && self.states.get(q) == Ok(PageState::Requested) =>
                {
                    last = next;
                    count += 1;
                }
                _ => break,
            }
        }
        self.fetch_and_place(p, count, scratch, true, Origin::Fault)
    }

    /// Gives back a claim (requested → missing in one CAS) so a later fault asks again.
    /// Async-signal-safe.
    pub fn release(&self, page: usize) {
        if self.states.release(page).is_ok() {
            bump(&self.stats.released);
            self.ring(); // whoever waits on the page fetches it afresh
        }
    }

    /// The next step of a fault parked on page `p` (`Retry` or `Watch`) that has waited
    /// `waited`: its page may be Zero now (REMOVE), placed by someone else, or still ours
    /// to fetch. `None`: still in someone else's hands, keep watching.
    pub fn retry_fault(
        &self,
        p: &PageRef,
        follow_up: FollowUp,
        waited: Duration,
        scratch: &mut [u8],
    ) -> Option<Placement> {
        let retry = follow_up.retries();
        Some(match (retry, self.states.get(p.page)) {
            // In someone else's hands for long (a SCHED_IDLE prefetcher starved of CPU
            // holding its claim): a local page is fetched and placed here instead — a
            // fault never waits on a background thread's priority.
            (false, Ok(PageState::Requested)) if self.may_take_over(p.page, waited) => {
                self.take_over(p, scratch)
            }
            // Still in someone else's hands: keep watching.
            (false, Ok(PageState::Requested)) => return None,
            (true, Ok(PageState::Requested)) => {
                self.fetch_and_place(p, 1, scratch, true, Origin::Fault)
            }
            (true, Ok(PageState::Zero)) => self.place(Request {
                at: *p,
                count: 1,
                content: Content::Zero,
                wake: true,
                origin: Origin::Fault,
            }),
            (true, Ok(PageState::Received)) => self.place(Request {
                at: *p,
                count: 1,
                content: self.received_again(p),
                wake: true,
                origin: Origin::Fault,
            }),
            // Given back (Missing) or done: wake; a thread still missing its page
            // refaults and is handled afresh.
            _ => self.wake(p.addr, p.size),
        })
    }

    /// Reports a fatal placement outcome (not from the SIGBUS handler).
    pub fn fail_placement(&self, placement: Placement) {
        match placement {
            Placement::Failed(e) => self.fail(e.into()),
            Placement::SourceFailed(e) => self.fail(e.into()),
            _ => {}
        }
    }
}
