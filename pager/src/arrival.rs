//! How a page a remote source delivers is placed: the engine's side of the
//! [`Placer`](crate::Placer), with the same rules as the fault path (gate, removed pages as
//! zeros, EEXIST, EAGAIN retried). The placer reaches it through the [`Engine`] trait, so
//! the handle a source holds (defined below the source) never names the engine that holds
//! the source.

use std::time::Duration;

use page_state::PageState;

use crate::error::{Error, Result, SourceError};
use crate::place::{Content, GoneSince, Origin, Placement, Request};
use crate::placer::{Engine, Placed, Run};
use crate::shared::Shared;
use crate::states::PageStates;
use crate::stats::bump;

impl Engine for Shared {
    fn place_arrival(&self, offset: u64, data: Option<&[u8]>) -> Result<Placed> {
        let Some(p) = self.regions.by_offset(offset) else {
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
        let content = match self.states.get(p.page) {
            Ok(PageState::Received) => return Ok(Placed::Duplicate),
            // Dropped (REMOVE) or known zero: the arrival is stale; the page reads zero.
            Ok(PageState::Zero) => Content::Zero,
            _ => data.map_or(Content::Zero, Content::Data),
        };
        let mut gone = GoneSince::default();
        loop {
            if self.stopping() {
                return Ok(Placed::Stopped);
            }
            let placement = self.place(Request {
                at: p,
                count: 1,
                content,
                wake: true,
                origin: Origin::Arrival,
            });
            match placement.or_give_up(&mut gone) {
                Placement::Done | Placement::Asked => return Ok(Placed::Placed),
                Placement::Again { .. } => std::thread::sleep(Duration::from_micros(50)),
                Placement::Dropped => return Ok(Placed::Stopped),
                failed => {
                    // The pager stops with the kernel's refusal; the source sees it stop.
                    self.fail_placement(failed);
                    return Ok(Placed::Stopped);
                }
            }
        }
    }

    fn place_arrivals(&self, offset: u64, run: Run<'_>) -> Result<Option<usize>> {
        let lookup = |off: u64| self.regions.by_offset(off);
        let len = run.len();
        let one_by_one = |from: usize, ps: usize| -> Result<Option<usize>> {
            let mut placed = 0;
            for i in from..len / ps {
                // Past 2^64 no image offset, so no region: the rest of the run is nowhere
                // (a wrapping sum put it at offset 0 on, pages nobody named).
                let Some(off) = offset.checked_add((i * ps) as u64) else {
                    break;
                };
                match self.place_arrival(off, run.page(i, ps))? {
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
            let ps = self.regions.min_page_size();
            return if len % ps == 0 && len != 0 {
                one_by_one(0, ps)
            } else {
                Ok(None)
            };
        };
        if p.offset != offset || len % p.size != 0 || len == 0 {
            return Err(Error::BadRegion {
                base: p.addr,
                len,
                reason: "an arriving run must start on a page and hold whole pages",
            });
        }
        let ps = p.size;
        let n = len / ps;
        // One region, in one piece: the run is placed with one ioctl built from `p`.
        let last = offset.checked_add(((n - 1) * ps) as u64);
        let contiguous = last.and_then(lookup).is_some_and(|last| {
            last.region == p.region
                && last.page == p.page + n - 1
                && last.addr == p.addr + (n - 1) * ps
        });
        if !contiguous {
            return one_by_one(0, ps);
        }
        let open = |i: usize| {
            matches!(
                self.states.get(p.page + i),
                Ok(PageState::Missing | PageState::Requested)
            )
        };
        let mut placed = 0;
        let mut i = 0;
        while i < n {
            if self.stopping() {
                return Ok(None);
            }
            if !open(i) {
                // Received: a duplicate. Zero: dropped here meanwhile, `place_arrival` zeroes it.
                if let Ok(PageState::Zero) = self.states.get(p.page + i) {
                    let off = offset + (i * ps) as u64;
                    if self.place_arrival(off, run.page(i, ps))? == Placed::Placed {
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
            let Some(q) = self.page(p.page + i) else {
                // Unmapped meanwhile: what is left goes page by page (and is skipped).
                return Ok(one_by_one(i, ps)?.map(|rest| placed + rest));
            };
            match self.place(Request {
                at: q,
                count: j - i,
                content: match run {
                    Run::Data(d) => Content::Data(&d[i * ps..j * ps]),
                    Run::Zeros(_) => Content::Zero,
                    Run::Moving { at, .. } => Content::Move(at + i * ps),
                },
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
                    self.fail_placement(failed);
                    return Ok(None);
                }
            }
            i = j;
        }
        Ok(Some(placed))
    }

    fn may_move_from(&self, data: &[u8]) -> bool {
        let (start, len) = (data.as_ptr() as usize, data.len());
        let ps = uffd_core::page_size();
        start % ps == 0 && len % ps == 0 && len > 0 && !self.regions.overlaps(start, len)
    }

    fn fail_source(&self, error: SourceError) {
        bump(&self.stats.source_errors);
        self.fail(error.into());
    }

    fn page_states(&self) -> PageStates<'_> {
        PageStates { map: &self.states }
    }
}
