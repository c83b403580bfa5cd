//! The placement handle for remote sources: pages that arrive later, on a thread of the
//! source's own, are placed through a cloneable [`Placer`] with the same rules as the
//! fault path (gate, removed pages as zeros, EEXIST, EAGAIN retried).

use std::time::Duration;

use page_state::PageState;

use crate::error::{Error, Result};
use crate::place::{Content, Origin, Placement, Request};
use crate::shared::Shared;
use crate::states::PageStates;
use crate::stats::bump;

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
        let Some(p) = shared.regions.by_offset(offset) else {
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
        loop {
            if shared.stopping() {
                return Ok(Placed::Stopped);
            }
            match shared.place(Request {
                at: p,
                count: 1,
                content,
                wake: true,
                origin: Origin::Arrival,
            }) {
                Placement::Done | Placement::Asked => return Ok(Placed::Placed),
                Placement::Again { .. } => std::thread::sleep(Duration::from_micros(50)),
                Placement::Dropped => return Ok(Placed::Stopped),
                failed => {
                    // The pager stops with the kernel's refusal; the source sees it stop.
                    shared.fail_placement(failed);
                    return Ok(Placed::Stopped);
                }
            }
        }
    }

    /// Places a run of arriving pages, `data` being whole pages from image offset `offset`,
    /// with one ioctl per stretch of pages still to be placed (Missing or Requested);
    /// received pages are skipped, known-zero ones get zeros (as in [`place`]), pages no
    /// mapped region holds (unmapped meanwhile) are skipped. Returns how many pages were
    /// placed, or `None` if the pager is gone or stopping.
    ///
    /// [`place`]: Placer::place
    pub fn place_run(&self, offset: u64, data: &[u8]) -> Result<Option<usize>> {
        let Some(shared) = self.shared.upgrade() else {
            return Ok(None);
        };
        let lookup = |off: u64| shared.regions.by_offset(off);
        let one_by_one = |from: usize, ps: usize| -> Result<Option<usize>> {
            let mut placed = 0;
            for i in from..data.len() / ps {
                match self.place(offset + (i * ps) as u64, Some(&data[i * ps..(i + 1) * ps]))? {
                    Placed::Placed => placed += 1,
                    Placed::Duplicate | Placed::NoRegion => {}
                    Placed::Stopped => return Ok(None),
                }
            }
            Ok(Some(placed))
        };
        let Some(p) = lookup(offset) else {
            // Its first page went away: place what is still mapped, page by page (pages
            // are the smallest size a region uses).
            let ps = shared.regions.min_page_size();
            return if data.len() % ps == 0 && !data.is_empty() {
                one_by_one(0, ps)
            } else {
                Ok(None)
            };
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
        if !contiguous {
            return one_by_one(0, ps);
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
                // Unmapped meanwhile: what is left goes page by page (and is skipped).
                return Ok(one_by_one(i, ps)?.map(|rest| placed + rest));
            };
            match shared.place(Request {
                at: q,
                count: j - i,
                content: Content::Data(&data[i * ps..j * ps]),
                wake: true,
                origin: Origin::Arrival,
            }) {
                Placement::Done | Placement::Asked => placed += j - i,
                // The address space is changing: the careful path, page by page.
                Placement::Again { .. } => {
                    return Ok(one_by_one(i, ps)?.map(|rest| placed + rest));
                }
                Placement::Dropped => return Ok(None),
                failed => {
                    shared.fail_placement(failed);
                    return Ok(None);
                }
            }
            i = j;
        }
        Ok(Some(placed))
    }

    /// Reports that a remote source can no longer deliver pages it answered
    /// [`Fetched::Pending`](crate::Fetched::Pending) for (retries exhausted, data that failed
    /// verification): the pager records the error, stops, poisons every page not yet
    /// placed (unless told not to: the faulting threads get SIGBUS, never zeros), tells
    /// the embedder ([`Pager::wait`](crate::Pager::wait)) and returns the error from
    /// [`Pager::stop`](crate::Pager::stop).
    pub fn fail(&self, error: crate::SourceError) {
        if let Some(shared) = self.shared.upgrade() {
            bump(&shared.stats.source_errors);
            shared.fail(error.into());
        }
    }

    /// Runs `f` on a read-only view of the page states (what a remote source reports when
    /// it reconnects: the present set, the pages still Requested); `None` once the pager
    /// is gone.
    pub fn states<R>(&self, f: impl FnOnce(PageStates<'_>) -> R) -> Option<R> {
        let shared = self.shared.upgrade()?;
        Some(f(PageStates {
            map: &shared.states,
        }))
    }

    /// Whether page `page` (index in the state map) is still to be placed; `None` once
    /// the pager is gone.
    pub fn state(&self, page: usize) -> Option<PageState> {
        self.shared.upgrade()?.states.get(page).ok()
    }
}
