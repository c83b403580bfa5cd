//! How a receiver lands what arrives: page runs copied in before a pager runs or placed
//! through it after — in pieces on two threads, or, for whole 2 MiB blocks read aligned,
//! moved in from the reader's buffer ([`Receiver::move_blocks`]) — and DISCARD.

use std::sync::atomic::Ordering;
use std::time::Instant;

use pager::{PageState, PageStates};

use super::{Land, Receiver, STAT};
use crate::link::Chan;
use crate::wire::{Channel, PageRange};
use crate::Error;

/// Pages a run lands in pieces of, on two threads: ~70 µs of landing, a few times a
/// helper's wakeup.
const PIECE: u64 = 32;

/// Whether page `p` is still to be placed (Missing or Requested): only such pages are
/// placed, and told of, from a frame.
fn unplaced(s: &PageStates<'_>, p: u64) -> bool {
    matches!(
        s.get(p as usize),
        Some(PageState::Missing | PageState::Requested)
    )
}

impl Receiver {
    /// Lands pages `first..` with `data`, or zero pages when `data` is `None`, if `chan`'s
    /// pair is current.
    pub(super) fn land_pages(
        &self,
        chan: &Chan,
        first: u64,
        count: u64,
        data: Option<&[u8]>,
    ) -> Result<(), Error> {
        let land = self.land();
        self.current(chan, "pages")?;
        // In pieces on both CPUs: one thread landing a whole stream (digest and copy) was
        // its bottleneck, the other CPU idle.
        self.helper.for_each(count.div_ceil(PIECE) as usize, |i| {
            let (at, ps) = (i as u64 * PIECE, self.ps);
            let (first, count) = (first + at, PIECE.min(count - at));
            let data = data.map(|d| &d[at as usize * ps..][..count as usize * ps]);
            self.land_piece(&land, PageRange { first, count }, data)
        })?;
        Ok(())
    }

    /// Lands `data` (whole pages from `first`) by moving its whole blocks into place, if
    /// it can ([`Receiver::move_blocks`]): `None` if it cannot, and the caller copies.
    pub(super) fn land_moving(
        &self,
        chan: &Chan,
        first: u64,
        data: &mut [u8],
        spare: &mut [u8],
    ) -> Option<Result<(), Error>> {
        const BLOCK: usize = uffd_core::HUGE_PAGE_SIZE;
        let (ps, count) = (self.ps, (data.len() / self.ps) as u64);
        let block_pages = (BLOCK / ps) as u64;
        let aligned = data.as_ptr() as usize % BLOCK == 0 && data.len() % BLOCK == 0;
        if !self.moves.load(Ordering::Relaxed) || !aligned || first % block_pages != 0 {
            return None;
        }
        let land = self.land();
        let Land::Place(placer) = &*land else {
            return None;
        };
        // A block with a page present already would be split in the buffer by a partial
        // move (its huge page then faults back in 4 KiB pieces): those are copied.
        if placer.states(|s| (first..first + count).all(|p| unplaced(&s, p))) != Some(true) {
            return None;
        }
        Some((|| {
            self.current(chan, "pages")?;
            // Told before placing, in pieces on both CPUs (see `land_piece`); and first,
            // the spare populated, where the reader will receive the next such frame: the
            // kernel zeroes its huge pages here, beside the digests, rather than on the
            // reading thread inside its next `recv`.
            let told = &*data;
            let spare = (spare.as_mut_ptr() as usize, spare.len());
            self.helper
                .for_each(count.div_ceil(PIECE) as usize + 1, |i| {
                    let Some(i) = i.checked_sub(1) else {
                        return populate(spare);
                    };
                    let at = i as u64 * PIECE;
                    let n = PIECE.min(count - at);
                    let piece = &told[at as usize * ps..(at + n) as usize * ps];
                    let range = PageRange {
                        first: first + at,
                        count: n,
                    };
                    placer.states(|s| {
                        self.tell_landed(range, Some(piece), false, |p| unplaced(&s, p))
                    });
                    Ok::<_, Error>(())
                })?;
            let placed = placer.place_run_moving(first * ps as u64, data)?;
            let placed = placed.ok_or(Error::PagerStopped)?;
            self.stats.placed.fetch_add(placed as u64, STAT);
            Ok(())
        })())
    }

    /// Lands the pages of `range`, a piece of a run ([`Receiver::land_pages`]).
    fn land_piece(&self, land: &Land, range: PageRange, data: Option<&[u8]>) -> Result<(), Error> {
        let (ps, first, count) = (self.ps, range.first, range.count);
        let (start, end) = (first as usize, (first + count) as usize);
        match land {
            Land::Idle => {
                return Err(Error::Unexpected {
                    expected: "no pages before the session runs",
                    got: "pages",
                    channel: Channel::Main,
                })
            }
            Land::Copy { memory, states } => {
                self.tell_landed(range, data, true, |_| true);
                match data {
                    Some(d) => {
                        // Populated in one call, then copied: a first write faulting in
                        // each page costs ~60 % more here (405 against 260 ms per GiB of
                        // 4 KiB pages, `taskset -c 1`). An advice: if it fails, the copy
                        // faults the pages in.
                        let _ = memory.madvise(start * ps, d.len(), libc::MADV_POPULATE_WRITE);
                        // SAFETY: the decoder checked first + count <= pages of the advised
                        // geometry, which `memory` was mapped for; no pager serves it yet
                        // and no other thread reads or writes these pages (the workload
                        // starts after this land is gone, and a run's pieces are disjoint).
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                d.as_ptr(),
                                memory.as_ptr().add(start * ps),
                                d.len(),
                            )
                        };
                        states.mark_received_range(start, end)?;
                    }
                    // Known zero: dropped here (a private mapping reads zero after
                    // DONTNEED); a fault there later gets a zero page locally.
                    None => {
                        memory
                            .madvise(start * ps, (end - start) * ps, libc::MADV_DONTNEED)
                            .map_err(Error::io("drop zero pages"))?;
                        states.mark_zero_range(start, end)?;
                    }
                }
                self.stats.copied.fetch_add(count, STAT);
            }
            Land::Place(placer) => {
                // Told before placing: the placement publishes Received (a Release CAS),
                // so whoever sees the page placed sees what was told of it. A page present
                // already is not placed again, and not told of.
                placer.states(|s| self.tell_landed(range, data, false, |p| unplaced(&s, p)));
                let placed = match data {
                    Some(d) => placer.place_run(first * ps as u64, d)?,
                    None => placer.place_zero_run(first * ps as u64, count as usize * ps)?,
                };
                let placed = placed.ok_or(Error::PagerStopped)?;
                self.stats.placed.fetch_add(placed as u64, STAT);
            }
        }
        Ok(())
    }
    /// Drops pages the sender wrote after sending them, if `chan`'s pair is current: they
    /// are unmapped (a private mapping reads zeros, and faults once a pager serves it)
    /// and become Missing, to be sent again or asked for. Only before a pager runs
    /// ([`Land::Copy`]), when nothing but this thread touches the memory.
    pub(super) fn discard(&self, chan: &Chan, ranges: &[PageRange]) -> Result<(), Error> {
        let at = Instant::now();
        let ps = self.ps;
        let land = self.land();
        self.current(chan, "DISCARD")?;
        let Land::Copy { memory, states } = &*land else {
            return Err(Error::Unexpected {
                expected: "DISCARD before LISTEN",
                got: "DISCARD",
                channel: chan.channel,
            });
        };
        for r in ranges {
            let (start, end) = (r.first as usize, (r.first + r.count) as usize);
            memory
                .madvise(start * ps, (end - start) * ps, libc::MADV_DONTNEED)
                .map_err(Error::io("drop discarded pages"))?;
            // A page sent as zero goes through Received (zero → received → missing).
            states.mark_received_range(start, end)?;
            states.discard_range(start, end)?;
            if let Some(on_land) = &self.on_land {
                on_land.dropped(start..end);
            }
            self.stats.discarded.fetch_add(r.count, STAT);
        }
        let took = at.elapsed().as_nanos() as u64;
        self.stats.discarding_ns.fetch_add(took, STAT);
        Ok(())
    }

    /// Tells [`Receiver::on_land`] of the pages of `r` landing with `data` (`None`:
    /// zeros), those for which `lands(page)` holds: copied in before a pager runs
    /// ([`OnLand::copied`](super::OnLand::copied)) if `copied`, else placed through it
    /// ([`OnLand::placing`](super::OnLand::placing)).
    fn tell_landed(
        &self,
        r: PageRange,
        data: Option<&[u8]>,
        copied: bool,
        lands: impl Fn(u64) -> bool,
    ) {
        let Some(on_land) = &self.on_land else {
            return;
        };
        for (i, p) in (r.first..r.first + r.count).enumerate() {
            if lands(p) {
                let page = data.map(|d| &d[i * self.ps..(i + 1) * self.ps]);
                match copied {
                    true => on_land.copied(p, page),
                    false => on_land.placing(p, page),
                }
            }
        }
    }
}

/// Populates the reader's spare, `len` bytes at `at` (none if empty): an advice, so a
/// failure only costs the reading thread the faults.
fn populate((at, len): (usize, usize)) -> Result<(), Error> {
    use nix::sys::mman::{madvise, MmapAdvise};
    let Some(at) = std::ptr::NonNull::new(at as *mut std::ffi::c_void).filter(|_| len > 0) else {
        return Ok(());
    };
    // SAFETY: the spare is whole pages of the reader's own buffer, which it lent us with
    // the frame; populating writes nothing a reader could see (zeros into pages that are
    // not there).
    if let Err(e) = unsafe { madvise(at, len, MmapAdvise::MADV_POPULATE_WRITE) } {
        log::debug!("populating the reader's spare: {e}");
    }
    Ok(())
}
