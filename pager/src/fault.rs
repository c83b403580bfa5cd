//! A fault's decision: the page-state map says what to do with it — ask the source (the
//! first fault on a missing page), wait for whoever asked (requested), only wake or put a
//! dropped page back as zeros (received), or place a zero page (zero) — then the page is
//! fetched and [placed](crate::place), and fault-around brings its neighbours.

use std::sync::atomic::Ordering;

use page_state::RequestOutcome;
use uffd_core::FaultFlags;

use crate::place::{Content, Origin, Placement};
use crate::region::{PageRef, Resolve};
use crate::shared::Shared;
use crate::source::Fetched;
use crate::stats::{add, bump};

/// What a handler must do after a fault it could not finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FollowUp {
    /// EAGAIN: retry the placement once the pending events are read.
    Retry,
    /// Another party requested the page: wake the fault once the page leaves Requested.
    Watch,
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

    /// Resolves one fault (handler threads). Returns the page if the caller must follow
    /// up: retry it (EAGAIN), or watch it (someone else requested it) until it leaves
    /// Requested.
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
        let outcome = self.states.request(p.page).ok()?; // in range: looked up above
        let placement = match outcome {
            RequestOutcome::Requested => {
                if let Some(rec) = &self.recorder {
                    rec.record(p.page);
                }
                let placed = self.fetch_and_place(&p, 1, scratch, wake, Origin::Fault);
                if matches!(placed, Placement::Done) && self.fault_around > 0 {
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
                self.place(&p, 1, self.received_again(&p), wake, Origin::Fault)
            }
            RequestOutcome::IsZero => {
                let content = match (p.resolve, flags.contains(FaultFlags::MINOR)) {
                    // The page cache still holds the page (DONTNEED on shared memory).
                    (Resolve::Continue { .. }, true) => Content::Present,
                    _ => Content::Zero,
                };
                self.place(&p, 1, content, wake, Origin::Fault)
            }
        };
        match placement {
            Placement::Again { .. } => Some((p, FollowUp::Retry)),
            Placement::Failed(e) => {
                self.fail(e.into());
                None
            }
            Placement::Done | Placement::Dropped => None,
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

    /// Places up to `fault_around` Missing pages after `p` in its region, woken.
    fn place_around(&self, p: &PageRef, scratch: &mut [u8]) {
        let mut prev = *p;
        for k in 1..=self.fault_around {
            let Some(next) = self.page(p.page + k) else {
                break;
            };
            if !prev.is_followed_by(&next) {
                break; // another region
            }
            prev = next;
            if self.states.request(next.page) != Ok(RequestOutcome::Requested) {
                continue;
            }
            // Fault-around is opportunistic: a page it cannot place now goes back to
            // Missing in one step, and a later fault or the prefetcher places it.
            match self.fetch_and_place(&next, 1, scratch, true, Origin::Prefetch) {
                Placement::Done => {}
                Placement::Again { .. } => {
                    self.release(next.page);
                    break;
                }
                Placement::Dropped => break,
                Placement::Failed(e) => {
                    self.fail(e.into());
                    break;
                }
            }
        }
    }

    /// Gives back a claim (requested → missing in one CAS) so a later fault asks again.
    /// Async-signal-safe.
    pub fn release(&self, page: usize) {
        if self.states.release(page).is_ok() {
            bump(&self.stats.released);
        }
    }
}
