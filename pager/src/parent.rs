//! A forked child's faults on shared memory. A MINOR region is one page cache for parent
//! and child, so the parent's engine decides its pages — it places one the child needs as
//! on a fault of its own — and the child's engine only maps the cache
//! ([`Shared::on_shared_fault`]): a page the parent placed, and the workload wrote since,
//! is never written over.
//!
//! **Waiting for the parent.** A page the parent has in flight (claimed by a handler or
//! the prefetcher, or asked of a remote source) is not the child's to place: the child's
//! fault is parked ([`FollowUp::Parent`]) until the parent's page leaves Requested, which
//! rings the parent's bell (`bell.rs`) that each child engine's handler watches. Before,
//! the child's fault was woken at once, it faulted again, and the pair went round until
//! the page landed — a CPU burnt, a `prioritize` per round. A child whose source promised answers at once
//! ([`ChildSource::Shared`](crate::ChildSource::Shared)) is failed instead when the page
//! waits on a remote source (`pending_is_fatal`), as its own fetch would be. The parent's
//! stop reaches a waiting child through the fork service, which fails it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use page_state::PageState;
use uffd_core::FaultFlags;

use crate::error::Error;
use crate::fault::{FaultOutcome, FollowUp};
use crate::place::{Content, GoneSince, Origin, Placement, Request};
use crate::region::PageRef;
use crate::shared::Shared;

impl Shared {
    /// A forked child's fault (this engine is the child's) on a page of a MINOR region,
    /// whose page cache the child shares with its parent: the parent's engine decides the
    /// page — its states say whether it was placed, and it places it if not, as on a fault
    /// of its own — then the child maps the cache as it is. The child's own states are not
    /// used for such pages. A page the parent has in flight parks the fault (module docs).
    pub(crate) fn on_shared_fault(
        &self,
        parent: &Shared,
        p: PageRef,
        scratch: &mut [u8],
        wake: bool,
        gone: &mut GoneSince,
    ) -> FaultOutcome {
        // A page of a region the parent unmapped since: its cache is all there is.
        if let (false, Some(q)) = (placed(parent, p.page), parent.page(p.page)) {
            let mut parent_gone = GoneSince::default();
            match parent.on_fault(q.addr, FaultFlags::empty(), scratch, true, &mut parent_gone) {
                FaultOutcome::Failed(failed) => {
                    // Not left claimed in the parent: its own next fault meets the failure.
                    parent.release(p.page);
                    return FaultOutcome::Failed(failed);
                }
                _ if placed(parent, p.page) => {}
                // The parent's placement met EAGAIN: retried by this engine, which holds
                // the parent's claim if the page is still Requested (no page reaches
                // Requested again once Received or Zero), and gives it back if it stops.
                FaultOutcome::FollowUp(_, FollowUp::Retry) => {
                    return FaultOutcome::FollowUp(p, FollowUp::Parent { retry: true })
                }
                // Asked of the parent's remote source, or someone else places it.
                FaultOutcome::Asked | FaultOutcome::FollowUp(..) => {
                    return self.wait_on_parent(parent, p)
                }
                // Dropped (the parent's range went away, or its process): map the cache.
                FaultOutcome::Resolved => {}
            }
        }
        let placement = self.map_shared(&p, wake);
        match placement.or_give_up(gone) {
            Placement::Done | Placement::Dropped | Placement::Asked => FaultOutcome::Resolved,
            Placement::Again { .. } => FaultOutcome::FollowUp(p, FollowUp::Retry),
            failed => FaultOutcome::Failed(failed),
        }
    }

    /// The next step of a child's fault parked on its parent's page `p` ([`FollowUp::Parent`],
    /// updated here): the parent's page is followed up as the parent's own parked fault
    /// would be (retried, watched, taken over from a starved prefetcher), then mapped here.
    /// `None`: still in flight, keep waiting.
    pub(crate) fn retry_shared(
        &self,
        parent: &Shared,
        p: &PageRef,
        follow_up: &mut FollowUp,
        waited: Duration,
        scratch: &mut [u8],
    ) -> Option<Placement> {
        let retry = follow_up.retries();
        if let (false, Some(q)) = (placed(parent, p.page), parent.page(p.page)) {
            let theirs = if retry {
                FollowUp::Retry
            } else {
                FollowUp::Watch
            };
            match parent.retry_fault(&q, theirs, waited, scratch) {
                None => return self.still_waiting(parent, p),
                Some(again @ Placement::Again { .. }) => return Some(again),
                Some(Placement::Asked) => {
                    *follow_up = FollowUp::Parent { retry: false };
                    return self.still_waiting(parent, p);
                }
                Some(failed @ (Placement::Failed(_) | Placement::SourceFailed(_))) => {
                    if retry {
                        parent.release(p.page); // the claim this engine held
                    }
                    return Some(failed);
                }
                Some(Placement::Done | Placement::Dropped) => {}
            }
            if !placed(parent, p.page) && parent.page(p.page).is_some() {
                // Given back (Missing) or dropped (Zero) meanwhile: the child's thread
                // faults again and its fault is decided afresh.
                return Some(self.wake(p.addr, p.size));
            }
        }
        Some(self.map_shared(p, true))
    }

    /// A child's fault on a page its parent has in flight: parked until the parent's page
    /// lands — unless this engine serves from its parent's source, which promised answers
    /// at once, and the page waits on that source's `Pending`: then it fails (as its own
    /// fetch would: `fetch_and_place`), its pages poisoned.
    fn wait_on_parent(&self, parent: &Shared, p: PageRef) -> FaultOutcome {
        match self.still_waiting(parent, &p) {
            None => FaultOutcome::FollowUp(p, FollowUp::Parent { retry: false }),
            Some(_) => FaultOutcome::Resolved,
        }
    }

    /// `None` while waiting on the parent's page is allowed; this engine failed otherwise
    /// (see [`wait_on_parent`](Self::wait_on_parent)), and `Dropped` is returned.
    fn still_waiting(&self, parent: &Shared, p: &PageRef) -> Option<Placement> {
        // Relaxed: a one-way flag, set when the parent's source first answered Pending.
        if self.pending_is_fatal && parent.remote.load(Ordering::Relaxed) {
            self.fail(Error::ChildSourcePending { offset: p.offset });
            return Some(Placement::Dropped);
        }
        None
    }

    /// Maps what the shared page cache holds at `p` into the child.
    fn map_shared(&self, p: &PageRef, wake: bool) -> Placement {
        self.place(Request {
            at: *p,
            count: 1,
            content: Content::Present,
            wake,
            origin: Origin::Fault,
        })
    }
}

/// Whether the parent placed page `page`.
fn placed(parent: &Shared, page: usize) -> bool {
    parent.states.get(page) == Ok(PageState::Received)
}
